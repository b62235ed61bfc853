"""Run machinery shared by train.py, test.py and predict.py: run folders and devices (runtime),
config checks against snapshots (snapshot_config), snapshots, torchrun (distributed), mixed
precision (amp), the evaluation protocol's scoring (evaluate), Sacred observer fixes (observers)
and the allocator switch (malloc)."""
