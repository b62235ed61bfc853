"""3D Felzenszwalb supervoxels (ADNet recipe): pseudo-labels for self-supervised episodic training.

- ``felzenszwalb_3d``: the algorithm in plain NumPy (readable definition, test oracle; slow).
- ``felzenszwalb_3d_cy``: the same algorithm in Cython (build: ``bash scripts/setup.sh``).
- ``generate_supervoxels``: the command that writes ``superpix-MIDDLE_<id>.nii.gz`` per scan.
"""
