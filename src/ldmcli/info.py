"""`ldm info`: what a model file is, or what an image was made with. Reads headers, not weights, where it can."""

from __future__ import annotations

from pathlib import Path


def describe_model(name: str) -> dict:
    from ldmcli.detect import detect_spec
    from ldmcli.hashing import model_hash
    from ldmcli.layout import read_components
    from ldmcli.models_dir import resolve_model

    path = resolve_model(name)
    components = read_components(path, meta=True)
    spec = detect_spec(components)
    networks = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    if components.text_encoder_2 is not None:
        networks["text_encoder_2"] = components.text_encoder_2
    described = {
        "path": str(path),
        "layout": components.layout,
        "family": spec.family,
        "name": spec.display_name,
        "prediction_type": spec.prediction_type,
        "prediction_source": spec.prediction_source,
        "schedule_source": spec.schedule_source,
        "timestep_spacing": spec.schedule.timestep_spacing,
        "scale_factor": spec.scale_factor,
        "native_size": spec.native_size,
        "hash": model_hash(path),
    }
    for network, tensors in networks.items():
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        described[f"{network}_parameters"] = sum(t.numel() for t in tensors.values())
        described[f"{network}_dtype"] = "/".join(dtypes)
        described[f"{network}_from"] = components.sources.get(network, str(path))
    described["unet_config"] = _fields(spec.unet)
    described["vae_config"] = _fields(spec.vae)
    described["text_encoder_config"] = _fields(spec.text_encoder)
    if spec.text_encoder_2 is not None:
        described["text_encoder_2_config"] = _fields(spec.text_encoder_2)
    if spec.recommended:
        described["recommended"] = spec.recommended
    if spec.notes:
        described["notes"] = list(spec.notes)
    if components.metadata:
        described["metadata"] = components.metadata
    return described


def describe_image(path: Path) -> dict:
    from ldmcli.metadata import A1111_KEY, LDM_KEY, read_png_text, request_from_png_text

    text = read_png_text(path)  # refuses a missing file, a FIFO or device, anything but a PNG
    request, given, model = request_from_png_text(text, str(path))
    described = {"path": str(path), "made_by": "ldm" if LDM_KEY in text else "A1111-compatible tool"}
    # Only what the image records: a field A1111's text leaves out was not necessarily ldm's default.
    described.update({name: value for name, value in request.record().items() if name in given})
    described["model"] = model
    if A1111_KEY in text:
        described["parameters"] = text[A1111_KEY]
    return described


def _fields(config) -> dict:
    return dict(config.__dict__)
