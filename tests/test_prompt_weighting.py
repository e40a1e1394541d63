"""Prompts read as A1111 reads them (issue 16): weights, long prompts, BREAK, clip skip, prompt editing.

The oracles are transformers' CLIP and diffusers' StableDiffusionPipeline, fed conditioning built here
by the rules written out in this file: A1111's documented parses (its `prompt_parser.py` docstring) as
tables, token chunks derived by hand, the "Original" emphasis as three lines of arithmetic
(`a1111_emphasis`), the same arithmetic diffusers' community `lpw_stable_diffusion.py` does for a
prompt of one chunk. Prompt editing is run through diffusers by swapping `prompt_embeds` from its
step callback. None of it goes through ldm's parser, chunker or encoder.
"""

from __future__ import annotations

import pytest
import torch

from ldmcli import pipeline, text_conditioning
from ldmcli.request import ImageRequest
from sd_fixtures import (
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sd1_pipeline,
    diffusers_latents_and_pixels,
)

SIZE = 64
SEED = 77
BOS, EOS = 49406, 49407


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD1 model, its final LayerNorm's bias moved off zero: the emphasis divides by the mean
    of the text encoder's output, which random zero-mean biases would put near zero (real CLIP's is not)."""
    pipe = build_tiny_sd1_pipeline(seed=3)
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias += 0.5
    path = tmp_path_factory.mktemp("weighted-sd1")
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    return pipeline.load(folder)


# --- the oracle ------------------------------------------------------------------------------------

# A1111's parses, from its prompt_parser.py docstring (parse_prompt_attention's examples) and by its
# rules: (x) x1.1, [x] /1.1, (x:w) xw, nesting multiplies, unbalanced brackets close at the end.
PARSES = {
    "a (red:1.5) circle on a [blue] background":
        [("a ", 1.0), ("red", 1.5), (" circle on a ", 1.0), ("blue", 1 / 1.1), (" background", 1.0)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).":
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    r"\(literal\] circle": [("(literal] circle", 1.0)],
    "(blurry:1.2), low quality": [("blurry", 1.2), (", low quality", 1.0)],
    "plain words": [("plain words", 1.0)],
}


def piece_tokens(reference, text: str) -> list[int]:
    return reference.tokenizer(text).input_ids[1:-1]  # transformers' tokenizer, BOS/EOS dropped


def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, written out: multiply each token's vector, restore the mean."""
    before = z.mean()
    z = z * weights[None, :, None]
    return z * (before / z.mean())


@torch.inference_mode()
def oracle_chunk(reference, tokens: list[int], weights: list[float], clip_skip: int = 1) -> torch.Tensor:
    """One chunk through transformers' CLIP: [BOS] tokens [EOS] EOS-padding (SD1), weighted."""
    assert len(tokens) <= 75
    ids = torch.tensor([[BOS, *tokens] + [EOS] * (76 - len(tokens))])
    out = reference.text_encoder(ids, output_hidden_states=True)
    z = out.last_hidden_state if clip_skip == 1 else \
        reference.text_encoder.final_layer_norm(out.hidden_states[-clip_skip])
    return a1111_emphasis(z, torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights))))


def oracle_prompt(reference, prompt: str, clip_skip: int = 1) -> torch.Tensor:
    tokens, weights = [], []
    for text, weight in PARSES[prompt]:
        ids = piece_tokens(reference, text)
        tokens += ids
        weights += [weight] * len(ids)
    return oracle_chunk(reference, tokens, weights, clip_skip)


# --- weights: the whole pipeline against diffusers -------------------------------------------------

WEIGHTED_CASES = [
    ("a (red:1.5) circle on a [blue] background", "(blurry:1.2), low quality"),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "plain words"),
    ("an (important) word", "(unbalanced"),
    (r"\(literal\] circle", "plain words"),
]


@pytest.mark.parametrize("prompt, negative", WEIGHTED_CASES)
@torch.inference_mode()
def test_weighted_prompt_images_equal_diffusers_fed_a1111_embeddings(prompt, negative, reference, ours):
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, None, prompt_embeds=oracle_prompt(reference, prompt),
        negative_prompt_embeds=oracle_prompt(reference, negative), height=SIZE, width=SIZE,
        num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED))
    request = ImageRequest(prompt=prompt, negative_prompt=negative, width=SIZE, height=SIZE, steps=8, cfg_scale=7.5,
                           sampler="euler_a")
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", prompt)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, prompt)


@torch.inference_mode()
def test_weights_change_the_image(ours):
    def image(prompt):
        request = ImageRequest(prompt=prompt, width=SIZE, height=SIZE, steps=4, sampler="euler")
        return pipeline.sample_latents(ours, request, [SEED])

    plain = image("a red circle")
    assert not torch.equal(image("a (red:1.4) circle"), plain)
    assert torch.equal(image(r"a red circle"), plain)


# --- long prompts and BREAK: the conditioning against per-chunk transformers -----------------------

# Chunks by A1111's rules, derived by hand. "cat" and "," are one token each ("cat</w>", ",</w>").
CAT, COMMA, DOG, A = 2368, 267, 1929, 320


def chunk_cases():
    eighty_cats = " ".join(["cat"] * 80)  # 80 tokens, no comma: 75 | 5
    # 71 cats, a comma (index 71), 6 dogs (72-77). The dog at index 75 arrives at a full chunk whose
    # last comma is 75 - 71 = 4 <= 20 tokens back: the chunk ends after the comma and the three dogs
    # before it move to the next chunk, ahead of the rest.
    wrapped = " ".join(["cat"] * 71) + ", " + " ".join(["dog"] * 6)
    # A comma 74 tokens back is too far (> 20): the chunk is cut at 75 tokens.
    far_comma = "cat, " + " ".join(["cat"] * 79)
    # Alternating, the 76th token is itself a comma: no word to move, the comma starts chunk 2.
    cats_and_commas = ", ".join(["cat"] * 40)  # cat , cat , ... cat: 79 tokens
    return {
        eighty_cats: [([CAT] * 75, None), ([CAT] * 5, None)],
        wrapped: [([CAT] * 71 + [COMMA], None), ([DOG] * 6, None)],
        far_comma: [([CAT, COMMA] + [CAT] * 73, None), ([CAT] * 6, None)],
        cats_and_commas: [([CAT, COMMA] * 37 + [CAT], None), ([COMMA, CAT] * 2, None)],
        "a cat BREAK a dog": [([A, CAT], None), ([A, DOG], None)],
        "BREAK a dog": [([], None), ([A, DOG], None)],
        # weighted, across the chunk boundary: every chunk restores its own mean
        "(" + eighty_cats + ":1.3)": [([CAT] * 75, 1.3), ([CAT] * 5, 1.3)],
    }


@pytest.mark.parametrize("prompt", list(chunk_cases()))
@torch.inference_mode()
def test_long_prompt_conditioning_equals_per_chunk_clip(prompt, reference, ours):
    chunks = chunk_cases()[prompt]
    expected = torch.cat([oracle_chunk(reference, tokens, [weight or 1.0] * len(tokens)) for tokens, weight in chunks],
                         dim=1)
    got = text_conditioning.encode_text(ours, [prompt]).context
    assert got.shape == expected.shape == (1, 77 * len(chunks), 64)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_change_after_token_75_changes_the_image(ours):
    base = " ".join(["cat"] * 78)

    def image(prompt):
        request = ImageRequest(prompt=prompt, width=SIZE, height=SIZE, steps=3, sampler="euler")
        return pipeline.sample_latents(ours, request, [SEED])

    assert not torch.equal(image(base + " red"), image(base + " blue"))


@torch.inference_mode()
def test_negative_prompt_shorter_than_the_prompt_is_padded_with_empty_chunks(reference, ours):
    long = " ".join(["cat"] * 80)
    cond, uncond = pipeline.guidance_conditioning(
        ours, ImageRequest(prompt=long, negative_prompt="dog", steps=2, width=SIZE, height=SIZE).checked(), 1)
    context = uncond.at(0)["context"]
    assert context.shape[1] == cond.at(0)["context"].shape[1] == 154
    empty = oracle_chunk(reference, [], [])
    torch.testing.assert_close(context[:, 77:], empty, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(context[:, :77], oracle_chunk(reference, [DOG], [1.0]), atol=2e-5, rtol=1e-5)


# --- clip skip: diffusers' clip_skip counts from 0 ---------------------------------------------------


@torch.inference_mode()
def test_clip_skip_2_equals_diffusers_clip_skip_1(reference, ours):
    # diffusers' own clip_skip path reads `text_encoder.text_model`, which transformers 5 removed: its
    # arithmetic is written out instead (hidden_states[-(clip_skip + 1)], then the final LayerNorm).
    embeds = {text: oracle_prompt(reference, text, clip_skip=2) for text in ("plain words", "(unbalanced")}
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, None, prompt_embeds=embeds["plain words"], negative_prompt_embeds=embeds["(unbalanced"],
        height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED))
    request = ImageRequest(prompt="plain words", negative_prompt="(unbalanced", width=SIZE, height=SIZE, steps=6,
                           cfg_scale=7.5, sampler="euler_a", clip_skip=2)
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", "clip skip 2")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, "clip skip 2")
    default = pipeline.sample_latents(ours, ImageRequest(**{**request.record(), "clip_skip": 1}), [SEED])
    assert not torch.equal(default, latents)


# --- prompt editing and alternation: diffusers with its prompt swapped from the step callback -------

EDITS = {
    # A1111's schedule for 6 steps, then which text each step (0-based) uses: the first entry whose
    # end step is at least the step number (A1111 counts denoiser calls; Euler calls once a step).
    "a [cat:dog:2]": ["a cat"] * 3 + ["a dog"] * 3,  # [(2, "a cat"), (6, "a dog")]
    "a [cat:dog:0.5]": ["a cat"] * 4 + ["a dog"] * 2,  # "0.5" has a point: 0.5 x 6 = step 3
    "a [dog:4]": ["a "] * 5 + ["a dog"],  # [(4, "a "), (6, "a dog")]
    "a [cat|dog]": ["a cat", "a cat", "a dog", "a cat", "a dog", "a cat"],  # [(1, cat), (2, dog), (3, cat), ...]
}
# Heun calls the model twice a step but once in its last (11 calls for 6 steps), and A1111 lays the
# timeline of a second-order sampler over twice the steps (12): "0.5" switches after call 6.
HEUN_EDITS = {
    "a [cat:dog:0.5]": ["a cat"] * 7 + ["a dog"] * 4,  # [(6, "a cat"), (12, "a dog")]
    "a [cat|dog]": ["a cat", "a cat"] + ["a dog", "a cat"] * 4 + ["a dog"],  # [(1, cat), (2, dog), ... (12, dog)]
}


@pytest.mark.parametrize("sampler, prompt", [("euler", p) for p in EDITS] + [("heun", p) for p in HEUN_EDITS])
@torch.inference_mode()
def test_prompt_editing_equals_diffusers_with_prompt_swapped_each_call(sampler, prompt, reference, ours):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    texts = (EDITS if sampler == "euler" else HEUN_EDITS)[prompt]
    embeds = {text: reference.encode_prompt(text, "cpu", 1, False)[0] for text in set(texts)}
    negative = reference.encode_prompt("blurry", "cpu", 1, False)[0]

    def swap(pipe, step, timestep, tensors):
        if step + 1 < len(texts):
            tensors["prompt_embeds"] = torch.cat([negative, embeds[texts[step + 1]]])
        return tensors

    scheduler = reference.scheduler
    reference.scheduler = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}[sampler].from_config(
        scheduler.config)
    try:
        # diffusers' loop makes one model call an iteration (Heun's two are two iterations).
        expected = reference(prompt_embeds=embeds[texts[0]], negative_prompt_embeds=negative, height=SIZE, width=SIZE,
                             num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
                             callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                             output_type="latent").images
    finally:
        reference.scheduler = scheduler
    request = ImageRequest(prompt=prompt, negative_prompt="blurry", width=SIZE, height=SIZE, steps=6, cfg_scale=7.5,
                           sampler=sampler)
    assert_latents_match(pipeline.sample_latents(ours, request, [SEED]), expected, "sd1", f"{sampler} {prompt}")


# --- extra-network tags: removed before parsing, as A1111 does -------------------------------------


@torch.inference_mode()
def test_network_tags_are_removed_from_the_text(ours):
    def image(prompt):
        request = ImageRequest(prompt=prompt, width=SIZE, height=SIZE, steps=3, sampler="euler")
        return pipeline.sample_latents(ours, request, [SEED])

    assert torch.equal(image("a (red:1.2) cat <lora:film grain:0.8>"), image("a (red:1.2) cat "))
    assert not torch.equal(image("a (red:1.2) cat <lora:film grain:0.8>"), image("a (red:1.2) cat <lora:film grain:0.8"))


@torch.inference_mode()
def test_network_tags_in_the_negative_prompt_stay_words(ours):
    # A1111 reads extra networks from the prompt only (processing.parse_extra_network_prompts): in the
    # negative prompt a tag is text CLIP reads.
    def cond(negative):
        request = ImageRequest(prompt="a cat", negative_prompt=negative, width=SIZE, height=SIZE, steps=3).checked()
        return pipeline.guidance_conditioning(ours, request, 1)[1].at(0)["context"]

    tagged = cond("blurry <lora:x:1>")
    assert not torch.equal(tagged, cond("blurry "))
    assert torch.equal(tagged, text_conditioning.encode_text(ours, ["blurry <lora:x:1>"]).context)


# --- SDXL: both encoders chunk alike, each restores its own mean; the pooled vector is chunk 1's ----


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from sd_fixtures import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=5)
    path = tmp_path_factory.mktemp("weighted-sdxl")
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, pipeline.load(path)


@torch.inference_mode()
def test_sdxl_long_weighted_prompt_equals_per_chunk_clip(sdxl):
    reference, ours = sdxl
    prompt = "(cat:1.2) " + " ".join(["dog"] * 80)  # cat + 74 dogs | 6 dogs (no comma to wrap at)
    chunks = [([CAT] + [DOG] * 74, [1.2] + [1.0] * 74), ([DOG] * 6, [1.0] * 6)]
    parts, pooled = [], None
    for tokens, weights in chunks:
        framed_weights = torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights)))
        ids_1 = torch.tensor([[BOS, *tokens] + [EOS] * (76 - len(tokens))])  # CLIP-L pads with EOS
        ids_2 = torch.tensor([[BOS, *tokens, EOS] + [0] * (75 - len(tokens))])  # bigG pads with "!" (0)
        first = reference.text_encoder(ids_1, output_hidden_states=True)
        second = reference.text_encoder_2(ids_2, output_hidden_states=True)
        parts.append(torch.cat([a1111_emphasis(first.hidden_states[-2], framed_weights),
                                a1111_emphasis(second.hidden_states[-2], framed_weights)], dim=-1))
        pooled = second.text_embeds if pooled is None else pooled
    got = text_conditioning.encode_text(ours, [prompt])
    torch.testing.assert_close(got.context, torch.cat(parts, dim=1), atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, atol=5e-5, rtol=1e-5)


# --- the NV generator feeds the sampler ------------------------------------------------------------


@torch.inference_mode()
def test_nv_rng_initial_noise_equals_diffusers_given_philox_latents(reference, ours):
    from diffusers import EulerDiscreteScheduler

    from ldmcli.rng_philox import PhiloxGenerator

    noise = PhiloxGenerator(SEED).randn((1, 4, SIZE // 8, SIZE // 8))
    scheduler = reference.scheduler
    reference.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    try:
        expected = reference("a red circle", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=5,
                             guidance_scale=7.5, latents=noise, output_type="latent").images
    finally:
        reference.scheduler = scheduler
    request = ImageRequest(prompt="a red circle", negative_prompt="blurry", width=SIZE, height=SIZE, steps=5,
                           cfg_scale=7.5, sampler="euler", rng="nv")
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", "rng nv")
    cpu = pipeline.sample_latents(ours, ImageRequest(**{**request.record(), "rng": "cpu"}), [SEED])
    assert not torch.allclose(cpu, latents)


# --- through the command line: recorded, and read back -----------------------------------------------


def test_cli_records_clip_skip_and_rng_and_regenerates_them(tmp_path, folder):
    import json

    from click.testing import CliRunner

    from ldmcli.cli import cli
    from ldmcli.metadata import read_png_text

    first = tmp_path / "first.png"
    result = CliRunner().invoke(cli, ["generate", "a (red:1.3) circle, [cat:dog:2]", "-m", str(folder), "-W", "64",
                                      "-H", "64", "--steps", "3", "--clip-skip", "2", "--rng", "nv", "-s", "-1",
                                      "-o", str(first), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["clip_skip"] == 2 and record["rng"] == "nv" and 0 <= record["seed"] < 2**32
    parameters = read_png_text(first)["parameters"]
    assert "Clip skip: 2" in parameters and "RNG: NV" in parameters and f"Seed: {record['seed']}," in parameters
    # the model's own spacing, in A1111's words its plain grid: "Automatic" would mean Karras for DPM++ 2M there
    assert "Schedule type: Uniform," in parameters
    again = tmp_path / "again.png"
    result = CliRunner().invoke(cli, ["generate", "--from-png", str(first), "-m", str(folder), "-o", str(again)])
    assert result.exit_code == 0, result.output
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


# --- a long prompt against a short negative prompt: padded (one batch) or not (two passes) ----------


def long_prompt_embeddings(reference):
    """A 2-chunk prompt (80 cats) and a 1-chunk negative prompt ("dog"), by the per-chunk oracle."""
    prompt = torch.cat([oracle_chunk(reference, [CAT] * 75, [1.0] * 75), oracle_chunk(reference, [CAT] * 5, [1.0] * 5)], 1)
    return prompt, oracle_chunk(reference, [DOG], [1.0])


@torch.inference_mode()
def test_padded_long_prompt_equals_diffusers_fed_padded_embeddings(reference, ours):
    prompt, negative = long_prompt_embeddings(reference)
    padded = torch.cat([negative, oracle_chunk(reference, [], [])], dim=1)  # A1111's pad: the empty prompt
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, None, prompt_embeds=prompt, negative_prompt_embeds=padded, height=SIZE, width=SIZE,
        num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED))
    request = ImageRequest(prompt=" ".join(["cat"] * 80), negative_prompt="dog", width=SIZE, height=SIZE, steps=6,
                           cfg_scale=7.5, sampler="euler_a")
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", "padded")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, "padded")


@torch.inference_mode()
def test_unpadded_long_prompt_equals_two_unet_passes_per_step(reference, ours):
    """A1111's default: the 154-token prompt and the 77-token negative prompt go through the U-Net apart.
    The oracle is diffusers' Euler scheduler and U-Net driven by hand, one U-Net call per text."""
    from diffusers import EulerDiscreteScheduler

    prompt, negative = long_prompt_embeddings(reference)
    scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    scheduler.set_timesteps(6)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps_u = reference.unet(x, t, encoder_hidden_states=negative).sample
        eps_c = reference.unet(x, t, encoder_hidden_states=prompt).sample
        latents = scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, latents).prev_sample
    request = ImageRequest(prompt=" ".join(["cat"] * 80), negative_prompt="dog", width=SIZE, height=SIZE, steps=6,
                           cfg_scale=7.5, sampler="euler", pad_conds=False)
    unpadded = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(unpadded, latents, "sd1", "unpadded")
    padded = pipeline.sample_latents(ours, ImageRequest(**{**request.record(), "pad_conds": True}), [SEED])
    assert not torch.allclose(padded, unpadded, atol=1e-3)


@torch.inference_mode()
def test_schedule_texts_share_one_emphasis_mean_as_in_a1111s_batch(reference, ours):
    """A1111 encodes a prompt's schedule texts as one batch, repeats included, and restores the mean
    over that whole batch: "[(cat:1.3)|dog]" over 5 steps is the batch cat, dog, cat, dog, cat."""
    texts = ["cat", "dog", "cat", "dog", "cat"]
    tokens = {"cat": ([CAT], [1.3]), "dog": ([DOG], [1.0])}
    ids = torch.tensor([[BOS, *tokens[t][0]] + [EOS] * 75 for t in texts])
    weights = torch.tensor([[1.0, *tokens[t][1]] + [1.0] * 75 for t in texts])
    z = reference.text_encoder(ids).last_hidden_state
    before = z.mean()
    z = z * weights[..., None]
    expected = z * (before / z.mean())
    schedule = text_conditioning.prompt_conditioning(ours, "[(cat:1.3)|dog]", 5)
    assert [end for end, _ in schedule] == [1, 2, 3, 4, 5]
    got = torch.cat([text.context for _, text in schedule])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# --- SD 2.x: chunks pad with "!" (id 0) after their EOS --------------------------------------------


@torch.inference_mode()
def test_sd2_long_weighted_prompt_equals_per_chunk_clip(tmp_path):
    from sd_fixtures import build_tiny_sd2_pipeline

    reference = build_tiny_sd2_pipeline(seed=6)
    with torch.no_grad():
        reference.text_encoder.final_layer_norm.bias += 0.5  # a mean away from zero, as for SD1 above
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = pipeline.load(tmp_path)
    prompt = "a cat BREAK (dog:0.8) " + " ".join(["cat"] * 76)  # "a cat" | dog x0.8 + 74 cats | 2 cats
    chunks = [([A, CAT], [1.0, 1.0]), ([DOG] + [CAT] * 74, [0.8] + [1.0] * 74), ([CAT] * 2, [1.0] * 2)]
    parts = []
    for tokens, weights in chunks:
        ids = torch.tensor([[BOS, *tokens, EOS] + [0] * (75 - len(tokens))])
        z = reference.text_encoder(ids).last_hidden_state  # diffusers' SD2 folders end at the penultimate block
        parts.append(a1111_emphasis(z, torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights)))))
    got = text_conditioning.encode_text(ours, [prompt]).context
    torch.testing.assert_close(got, torch.cat(parts, dim=1), atol=5e-5, rtol=1e-5)


def test_clip_skip_beyond_the_text_encoder_is_refused_before_loading(tmp_path, folder):
    from click.testing import CliRunner

    from ldmcli.cli import cli

    # The tiny text encoder has 2 blocks: clip skip 2 conditions on the first one's output, 3 on nothing.
    args = ["generate", "a cat", "-m", str(folder), "-W", "64", "-H", "64", "--steps", "1", "-o", str(tmp_path / "x.png")]
    result = CliRunner().invoke(cli, [*args, "--clip-skip", "3"])
    assert result.exit_code == 2 and "clip skip 3 is beyond this model's text encoder: at most 2" in result.output
    assert not (tmp_path / "x.png").exists()
    assert CliRunner().invoke(cli, [*args, "--clip-skip", "2"]).exit_code == 0


# --- ENSD: A1111's ImageRNG restarts each image's generator at seed + ENSD after the initial noise ----


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_ensd_restarts_the_generators_after_the_initial_noise(rng):
    from ldmcli.rng_philox import PhiloxGenerator

    def generator(seed):  # the oracle's generators: torch's CPU one, or A1111's NV one
        if rng == "nv":
            return PhiloxGenerator(seed).randn
        g = torch.Generator("cpu").manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=g)

    shape, seeds, ensd = (4, 3, 2), [10, 11], 31337
    firsts = [generator(s) for s in seeds]
    restarted = [generator(s + ensd) for s in seeds]
    expected = [torch.stack([d(shape) for d in firsts])] + [torch.stack([d(shape) for d in restarted]) for _ in range(2)]
    draw = pipeline.noise_source(seeds, shape, "cpu", torch.float32, rng, ensd)
    assert all(torch.equal(draw(), e) for e in expected)
    plain = pipeline.noise_source(seeds, shape, "cpu", torch.float32, rng)
    first, second = plain(), plain()
    assert torch.equal(first, expected[0]) and not torch.equal(second, expected[1])


def test_cli_records_ensd_and_an_a1111_ensd_is_honoured(tmp_path, folder):
    import json

    from click.testing import CliRunner

    from ldmcli.cli import cli
    from ldmcli.metadata import A1111_KEY, read_png_parameters, read_png_text

    out = tmp_path / "e.png"
    args = ["generate", "a cat", "-m", str(folder), "-W", "64", "-H", "64", "--steps", "3", "--sampler", "euler_a",
            "-s", "5", "--json"]
    result = CliRunner().invoke(cli, [*args, "--ensd", "31337", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["ensd"] == 31337
    assert "ENSD: 31337" in read_png_text(out)["parameters"]
    plain = tmp_path / "p.png"
    assert CliRunner().invoke(cli, [*args, "-o", str(plain)]).exit_code == 0
    from PIL import Image
    import numpy as np

    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))  # ancestral noise differs
    a1111 = "a cat\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 5, Size: 64x64, ENSD: 31337"
    recorded = read_png_parameters({A1111_KEY: a1111}, "a.png")
    assert recorded.request.ensd == 31337 and all(n.key != "ENSD" for n in recorded.notes)
