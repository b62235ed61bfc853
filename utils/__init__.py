"""Small helpers with no project imports: atomic file writes and checked image I/O (io),
resampling (resample), overlap metrics (metrics), RNG state capture (seed), plots (plots)."""
