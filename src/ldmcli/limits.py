"""What ldm refuses as too large, in one place (README, "Limits").

Each bound is checked before any model loads, so a careless script fails in milliseconds with a
one-line error (exit 2) instead of after minutes of loading, or by exhausting the machine.
"""

from __future__ import annotations

# Diffusion schedules have 1000 training timesteps: more sampling steps than that repeat timesteps.
MAX_STEPS = 1000

# torch.Generator.manual_seed takes any unsigned 64-bit seed; image i of a job uses seed + i.
MAX_SEED = 2**64 - 1

# Largest |cfg_scale| (ComfyUI's bound; A1111's slider stops at 30). Beyond it, guidance only scales the
# prediction's difference into bf16/fp16 overflow: the image comes out NaN after all its steps.
MAX_CFG_SCALE = 100

# Largest DeepCache interval (full U-Net evaluations every N): beyond ~10 the kept features are of another
# noise level altogether; the bound only keeps the value meaningful.
MAX_DEEP_CACHE = 100
# Largest token merging ratio (`--tome`): A1111's slider ends at 0.9; at 1 no token would be left to merge into.
MAX_TOME = 0.9

# Default largest image, width x height in pixels: 2048 x 2048 (4 MP), SDXL's native size four times
# over. Larger images are refused unless --max-pixels raises the bound: the U-Net's activations grow
# with the area (attention with its square at the highest levels), and a typo like -W 51200 should be
# an error, not an hour of swapping.
DEFAULT_MAX_PIXELS = 2048 * 2048

# Clip skip, in A1111's numbering (its slider's range): SD1's CLIP has 12 blocks.
MAX_CLIP_SKIP = 12

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


# --- files ldm reads: each is read whole, so each has a bound on what a damaged or hostile one costs --

# model_index.json, config.json and shard indexes are a few kB (SDXL's U-Net index: 130 kB); this bounds
# what a damaged or hostile one can make ldm read and parse.
MAX_JSON_BYTES = 16 * 1024 * 1024

# Bound on a scheduler config's training timesteps (Stable Diffusion's: 1000). The sampler builds
# tensors of that length: a config stating 1e9 would exhaust memory once sampling starts.
MAX_TRAIN_TIMESTEPS = 10_000

# Intra-op threads beyond the CPUs only add synchronisation (measured: the tiny test model's image
# takes 3x as long with 1000 threads on 2 CPUs), and each is an OS thread: --threads 100000 exhausts
# the machine's thread limit (pid_max is 32768 by default) and crashes. Four per CPU leaves room to
# experiment (os.cpu_count() counts hyperthreads and, in containers, the host's CPUs).
MAX_THREADS_PER_CPU = 4

# About 150 bytes an entry: room for ~100,000 model files.
MAX_CACHE_BYTES = 16 * 1024 * 1024

# The most resolution levels, blocks a level, and transformer blocks a U-Net or VAE config may state: far
# beyond any Stable Diffusion (SDXL: 3 levels, 2 ResBlocks a level, 10 transformer blocks), and small
# enough that what is generated from the config stays small. The key tables have an entry per block:
# "layers_per_block": 1e9 filled memory until the kernel killed ldm (and checking the parsed config was
# too late: parsing it builds per-block lists).
MAX_CONFIG_STRUCTURE = 64

# The longest `parameters` text or `ldm` record read: room for a prompt and a negative prompt of
# MAX_PROMPT_CHARS each, the parameters, and JSON's escapes. Longer is refused before parsing.
MAX_METADATA_CHARS = 4 * MAX_PROMPT_CHARS

# Pillow's bound on a decompressed text chunk (PngImagePlugin.MAX_TEXT_CHUNK), here for a stored one
# too: MAX_METADATA_CHARS characters of up to 4 UTF-8 bytes each fit.
MAX_TEXT_CHUNK_BYTES = 1024 * 1024
# A PNG's chunks are walked one by one (the image data skipped unread); this bounds the walk for a file
# made of tiny chunks. Encoders write 8-64 kB image data chunks: a 16k x 16k PNG has some 40,000.
MAX_PNG_CHUNKS = 1_000_000

# Largest tokenizer file read: CLIP's tokenizer.json is 3.6 MB, its vocab.json 1.6 MB.
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024


# --- ldm serve: what one HTTP request may ask for (the server runs one request at a time, so each bound
# is also how long one client can hold every other one up) -----------------------------------------------

# A request's body: room for a base64 init image and mask of a large photo (base64 adds a third).
MAX_REQUEST_BYTES = 64 * 1024 * 1024

# Images one request makes (A1111's n_iter x batch_size): a client wanting more sends more requests,
# which queue behind the others' instead of holding the server for hundreds of images.
MAX_IMAGES_PER_REQUEST = 64

# Requests waiting behind the one being made (`ldm serve --queue`); beyond it: HTTP 429.
DEFAULT_SERVER_QUEUE = 16
