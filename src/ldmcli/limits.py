"""What ldm refuses as too large, in one place (README, "Limits").

Each bound is checked before any model loads, so a careless script fails in milliseconds with a
one-line error (exit 2) instead of after minutes of loading, or by exhausting the machine.
"""

from __future__ import annotations

# Diffusion schedules have 1000 training timesteps: more sampling steps than that repeat timesteps.
MAX_STEPS = 1000

# torch.Generator.manual_seed takes any unsigned 64-bit seed; image i of a job uses seed + i.
MAX_SEED = 2**64 - 1

# Default largest image, width x height in pixels: 2048 x 2048 (4 MP), SDXL's native size four times
# over. Larger images are refused unless --max-pixels raises the bound: the U-Net's activations grow
# with the area (attention with its square at the highest levels), and a typo like -W 51200 should be
# an error, not an hour of swapping.
DEFAULT_MAX_PIXELS = 2048 * 2048

# Images in one run (all jobs, all batch counts): planning and naming them is done up front.
MAX_IMAGES_PER_RUN = 100_000

# A prompt (or negative prompt), in characters; CLIP reads 75 tokens a chunk, so this is far beyond use.
MAX_PROMPT_CHARS = 65_536

# A prompt file (or standard input), in bytes.
MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024

# One file-name component and a whole path, in bytes (Linux's NAME_MAX and PATH_MAX).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096

# The width or precision in an output template's format spec ({index:05d}): wider would only make
# names longer than MAX_NAME_BYTES, after allocating them.
MAX_FORMAT_WIDTH = MAX_NAME_BYTES
