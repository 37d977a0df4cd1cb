"""Post-processing cost: upsample-then-blur (default) vs blur-on-the-grid-then-upsample (--smooth-at-grid).

    .venv/bin/python benchmarks/post_smoothing.py

One process, 8-image batches of random 32x32 distance grids, 20 repetitions per row, ms per image.
"""

import time, numpy as np
from hyads import HyADS
m = HyADS(image_size=256)
rng = np.random.default_rng(0)
d = rng.random((8, 1, 32, 32)).astype(np.float32)
for flag in (False, True, False, True):
    m.config.smooth_at_grid = flag
    m._upsample_smooth(d)
    t = time.perf_counter()
    for _ in range(20): out = m._upsample_smooth(d)
    print(flag, (time.perf_counter() - t) / 20 / 8 * 1000, "ms/img")
m.config.smooth_at_grid = False; a = m._upsample_smooth(d)
m.config.smooth_at_grid = True; b = m._upsample_smooth(d)
print("max rel diff", np.abs(a - b).max() / np.abs(a).max(), np.corrcoef(a.ravel(), b.ravel())[0, 1])
