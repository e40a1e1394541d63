"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that a prompt calls by name.

The files, as A1111 (`textual_inversion.create_embedding_from_data`), ComfyUI (`sd1_clip.load_embed`)
and diffusers (`load_textual_inversion`) read them; the layout is told by the keys, not the suffix:

- A1111 `.pt`: a pickle {"string_to_param": {"*": [N, C]}, "string_to_token", "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}. Read with torch.load(weights_only=True): tensors and plain
  containers only. Files of the original textual-inversion repository keep "string_to_param" as an
  `nn.ParameterDict` (A1111's "fix for torch 1.12.1"), the one class allowed besides;
- kohya-ss / A1111 `.safetensors`: {"emb_params": [N, C]};
- SDXL: {"clip_l": [N, 768], "clip_g": [N, 1280]}, CLIP-L's vectors and bigG's (`.safetensors`, or a pickle);
- diffusers `learned_embeds.bin` / `.safetensors`: {token: [C] or [N, C]}.
Anything else with one tensor is read as that tensor (A1111's "diffuser concepts" rule); several
tensors under other keys, or more than one term under "string_to_param", are refused.

Names (A1111's `EmbeddingDatabase`): an embedding is called by its file name without the suffix
(`EasyNegative.safetensors` -> "EasyNegative"), found in the given folders and their subfolders
(empty files skipped, as A1111 skips them). A prompt calls it where the name's token ids appear in
the ids of one weighted piece of the prompt, the longest name first (`find_embedding_at_position`).
Names are matched as tokens, so as CLIP's tokenizer lowercases: "easynegative" calls
"EasyNegative". ComfyUI's `embedding:NAME` calls one by its file's path under a folder, with or
without the suffix, as spelled (case-sensitive where the file system is). A word that names no file
stays a word; an `embedding:NAME` that names none is an error.

Only the files a prompt calls are read, once, and only the folders' listing is read up front. An
embedding's width must be its model's text encoder's: 768 (SD 1.x), 1024 (SD 2.x), or a clip_l /
clip_g pair of 768 + 1280 (SDXL); otherwise it is refused naming the file and both widths (A1111
skips it silently, and the name stays words).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldmcli.errors import CheckpointError

if TYPE_CHECKING:
    from ldmcli.detect import ModelSpec
    from ldmcli.tokenizer import PromptTokenizer

# What A1111 reads as embeddings (its .png/.webp embeddings excepted), in the order ComfyUI tries them.
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
# The largest file read as an embedding: the largest real ones are about 0.5 MB (75 vectors of 1024
# floats, or SDXL pairs); a LoRA or a checkpoint put in the folder is refused, not read.
MAX_EMBEDDING_BYTES = 32 * 1024 * 1024
# The most vectors an embedding may have: A1111 keeps an embedding within one chunk of 75 tokens.
MAX_VECTORS = 75
# A1111's SDXL keys, in the order of the model's text encoders (CLIP-L, then OpenCLIP bigG).
SDXL_KEYS = ("clip_l", "clip_g")
# ComfyUI's call: "embedding:" at the start of a space-separated word, the rest of the word the name.
_REFERENCE = re.compile(r"(?<!\S)embedding:(\S+)")


class EmbeddingError(CheckpointError):
    """An embedding that cannot be used: unreadable, unsafe, another model's width, or not there."""


def widths_of(spec: ModelSpec) -> tuple[int, ...]:
    """The widths of a model's text encoders, the first encoder's first: what its embeddings must have."""
    second = () if spec.text_encoder_2 is None else (spec.text_encoder_2.width,)
    return (spec.text_encoder.width, *second)


@dataclass(eq=False)
class Embedding:
    """One embedding file, read: `vectors` [N, width] float32 per text encoder of the model."""

    name: str
    path: Path
    vectors: tuple[Tensor, ...]

    @property
    def count(self) -> int:
        """How many tokens it stands for in a prompt (each vector takes a token's place)."""
        return self.vectors[0].shape[0]

    @cached_property
    def short_hash(self) -> str:
        """A1111's TI hash: the first 12 hex digits of the file's SHA-256 (`Embedding.set_hash`)."""
        from ldmcli.hashing import embedding_hash

        return embedding_hash(self.path)

    @property
    def infotext_name(self) -> str:
        """The name as A1111 writes it in "TI hashes": without ':' and ','."""
        return self.name.replace(":", "").replace(",", "")


@dataclass
class EmbeddingLibrary:
    """The embeddings of some folders, for a model whose text encoders have `widths`.

    `files`: name -> file, as prompts call them (A1111: the file name's stem); `paths`: the relative
    paths ComfyUI's `embedding:NAME` may give (with and without the suffix) -> file.
    """

    widths: tuple[int, ...]
    files: dict[str, Path] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    folders: tuple[Path, ...] = ()
    loaded: dict[Path, Embedding] = field(default_factory=dict)
    _views: dict[tuple[int, int], EncoderEmbeddings] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, *folders: str | Path, widths: Sequence[int]) -> EmbeddingLibrary:
        """The embedding files in `folders` and their subfolders; the first folder wins a name found
        twice, then the file found first (folders walked in sorted order, .safetensors before .pt before
        .bin). Only names are listed here: files are read when a prompt calls them."""
        library = cls(widths=tuple(widths), folders=tuple(Path(f) for f in folders))
        for folder in library.folders:
            if not folder.is_dir():
                raise EmbeddingError(f"{folder}: not a folder of embeddings")
            for path in _embedding_files(folder):
                relative = path.relative_to(folder).as_posix()
                library.files.setdefault(path.stem, path)
                library.paths.setdefault(relative, path)
                library.paths.setdefault(relative[: -len(path.suffix)], path)
        return library

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> Embedding | None:
        """The embedding a prompt word `name` calls (exactly the file's stem), read on first use."""
        path = self.files.get(name)
        return None if path is None else self.load(path)

    def reference(self, name: str) -> Embedding | None:
        """The embedding ComfyUI's `embedding:NAME` calls: a relative path under a folder, with or
        without the suffix, else a file name stem."""
        path = self.paths.get(name) or self.files.get(name)
        return None if path is None else self.load(path)

    def load(self, path: Path) -> Embedding:
        """Read `path` as an embedding for this model (once); EmbeddingError if it cannot serve."""
        embedding = self.loaded.get(path)
        if embedding is None:
            embedding = self.loaded[path] = Embedding(path.stem, path, read_embedding(path, self.widths))
        return embedding

    def for_encoder(self, index: int, tokenizer: PromptTokenizer) -> EncoderEmbeddings:
        """The library as text encoder `index` (0: the first) sees it through its tokenizer."""
        key = (index, id(tokenizer))
        view = self._views.get(key)
        if view is None or view.tokenizer is not tokenizer:
            view = self._views[key] = EncoderEmbeddings(self, index, tokenizer)
        return view

    def ti_hashes(self, embeddings: Iterable[Embedding]) -> str:
        """A1111's "TI hashes" value for the embeddings an image used: "name: hash, name: hash"."""
        unique = {e.path: e for e in embeddings}.values()
        return ", ".join(f"{e.infotext_name}: {e.short_hash}" for e in unique)

    def describe(self) -> str:
        return ", ".join(map(str, self.folders)) or "no folder"


class EncoderEmbeddings:
    """The library as one text encoder sees it: prompt text -> its ids with embeddings in place, and
    each embedding's vectors for this encoder."""

    def __init__(self, library: EmbeddingLibrary, index: int, tokenizer: PromptTokenizer) -> None:
        self.library = library
        self.index = index
        self.tokenizer = tokenizer
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] | None = None

    def tokenize(self, text: str) -> list[int | Embedding]:
        """The ids of `text`, each `embedding:NAME` word replaced by the embedding it calls."""
        items: list[int | Embedding] = []
        start = 0
        for match in _REFERENCE.finditer(text):
            name, leftover = match.group(1), ""
            embedding = self.library.reference(name)
            if embedding is None and name.rstrip(",") != name:  # ComfyUI: "embedding:x," is x and a comma
                name, leftover = name.rstrip(","), name[len(name.rstrip(",")):]
                embedding = self.library.reference(name)
            if embedding is None:
                raise EmbeddingError(f"embedding:{name}: no such embedding in {self.library.describe()}")
            items += self.tokenizer.tokenize(text[start:match.start()])
            items.append(embedding)
            start = match.end() - len(leftover)
        return items + self.tokenizer.tokenize(text[start:])

    def match(self, items: Sequence[int | Embedding], position: int) -> tuple[Embedding, int] | None:
        """The embedding that starts at `items[position]` and how many items it takes, or None: an
        `embedding:NAME` item, or the longest name whose ids follow from there (A1111's rule)."""
        item = items[position]
        if isinstance(item, Embedding):
            return item, 1
        for ids, name in self.lookup.get(item, ()):
            if tuple(items[position:position + len(ids)]) == ids:
                embedding = self.library.get(name)
                assert embedding is not None
                return embedding, len(ids)
        return None

    def vectors(self, embedding: Embedding) -> Tensor:
        """The embedding's vectors for this text encoder: [N, width]."""
        return embedding.vectors[self.index]

    @property
    def lookup(self) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        """first id -> [(ids, name)], longest first: every name tokenized once, as A1111 registers it."""
        if self._lookup is None:
            lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
            for name in self.library.files:
                ids = tuple(self.tokenizer.tokenize(name))
                if ids:  # a name of nothing but whitespace can never be called (A1111 fails to register it)
                    lookup.setdefault(ids[0], []).append((ids, name))
            for entries in lookup.values():
                entries.sort(key=lambda entry: len(entry[0]), reverse=True)  # stable: earlier files win ties
            self._lookup = lookup
        return self._lookup


def _embedding_files(folder: Path) -> list[Path]:
    """The non-empty regular files with an embedding suffix under `folder`, symlinks followed (each
    real folder once), in a stable order."""
    order = {suffix: i for i, suffix in enumerate(EMBEDDING_SUFFIXES)}
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        names = [n for n in files if Path(n).suffix.lower() in order]
        for name in sorted(names, key=lambda n: (Path(n).stem, order[Path(n).suffix.lower()])):
            path = Path(root) / name
            try:
                if path.is_file() and path.stat().st_size > 0:
                    found.append(path)
            except OSError:
                continue
    return found


def read_embedding(path: Path, widths: Sequence[int]) -> tuple[Tensor, ...]:
    """The vectors of an embedding file for text encoders of `widths`: one [N, width] float32 tensor
    per encoder. EmbeddingError naming the file for anything that cannot serve this model."""
    data = _read_file(path)
    vectors = _vectors(path, data)
    return _fit(path, vectors, tuple(widths))


def _read_file(path: Path) -> object:
    from ldmcli.checkpoint import SAFETENSORS_SUFFIXES, read_state_dict
    from ldmcli.files import check_regular_file

    try:
        check_regular_file(path, EmbeddingError)
        size = path.stat().st_size
    except OSError as exc:
        raise EmbeddingError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size > MAX_EMBEDDING_BYTES:
        raise EmbeddingError(f"{path}: {size:,} bytes is too large for an embedding (at most "
                             f"{MAX_EMBEDDING_BYTES:,}); is it a LoRA or a model?")
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return read_state_dict(path)
        return _unpickle(path)
    except EmbeddingError:
        raise
    except CheckpointError as exc:
        raise EmbeddingError(str(exc)) from exc


def _unpickle(path: Path) -> object:
    """torch.load(weights_only=True), an `nn.ParameterDict` allowed (old files' "string_to_param")."""
    from ldmcli.checkpoint import _unpickle as unpickle

    with warnings.catch_warnings(), torch.serialization.safe_globals([torch.nn.ParameterDict]):
        warnings.simplefilter("ignore")
        try:
            return unpickle(path)
        except CheckpointError as exc:
            raise EmbeddingError(str(exc)) from exc


def _vectors(path: Path, data: object) -> Tensor | tuple[Tensor, Tensor]:
    """The file's vectors by A1111's rules: one tensor, or SDXL's (clip_l, clip_g)."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        terms = data["string_to_param"]
        if isinstance(terms, torch.nn.ParameterDict):
            terms = dict(vars(terms).get("_parameters") or {})
        if not isinstance(terms, dict) or len(terms) != 1:
            count = len(terms) if isinstance(terms, dict) else type(terms).__name__
            raise EmbeddingError(f"{path}: string_to_param holds {count} terms; an embedding has one")
        return _tensor(path, "string_to_param", next(iter(terms.values())))
    if all(key in data for key in SDXL_KEYS):
        return _tensor(path, "clip_l", data["clip_l"]), _tensor(path, "clip_g", data["clip_g"])
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:  # diffusers {token: vector(s)}, kohya {"emb_params": ...}
        key, value = next(iter(tensors.items()))
        return _tensor(path, str(key), value)
    keys = ", ".join(sorted(map(str, data))[:5]) or "nothing"
    raise EmbeddingError(f"{path}: not a textual-inversion embedding (it holds {keys}; an embedding holds "
                         "string_to_param, emb_params, clip_l + clip_g, or one {token: vectors})")


def _tensor(path: Path, key: str, value: object) -> Tensor:
    """An embedding's [N, C] vectors as float32 ([C] is one vector)."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or not value.is_floating_point() \
            or value.device.type != "cpu" or value.ndim not in (1, 2):
        what = f"a {value.ndim}-D {str(value.dtype).removeprefix('torch.')} tensor" \
            if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise EmbeddingError(f"{path}: {key} is {what}, not vectors ([vectors, width] floating point)")
    vectors = value.detach().reshape(-1, value.shape[-1]).to(torch.float32)
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise EmbeddingError(f"{path}: {key} holds no vectors (shape {list(value.shape)})")
    if vectors.shape[0] > MAX_VECTORS:
        raise EmbeddingError(f"{path}: {vectors.shape[0]} vectors; a prompt chunk holds at most {MAX_VECTORS}")
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: {key} holds NaN or infinite values")
    return vectors


def _fit(path: Path, vectors: Tensor | tuple[Tensor, Tensor], widths: tuple[int, ...]) -> tuple[Tensor, ...]:
    """The vectors per text encoder, if their widths are the encoders'."""
    expected = " + ".join(map(str, widths))
    encoders = "text encoder is" if len(widths) == 1 else "text encoders are"
    if isinstance(vectors, tuple):
        got = tuple(v.shape[1] for v in vectors)
        if got != widths:
            raise EmbeddingError(f"{path}: an SDXL embedding (clip_l {got[0]} + clip_g {got[1]} wide); this "
                                 f"model's {encoders} {expected} wide")
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise EmbeddingError(f"{path}: clip_l has {vectors[0].shape[0]} vectors and clip_g "
                                 f"{vectors[1].shape[0]}; they must be as many")
        return vectors
    if len(widths) != 1 or vectors.shape[1] != widths[0]:
        kind = "" if len(widths) == 1 else ", not an SDXL one (clip_l + clip_g)"
        raise EmbeddingError(f"{path}: an embedding {vectors.shape[1]} wide{kind}; this model's {encoders} "
                             f"{expected} wide")
    return (vectors,)
