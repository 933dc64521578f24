"""Byte-level tokenizer with a Llama-3-like chat format, as a Torchtune ``ModelTokenizer`` + ``Transform``.

Ids 0..255 are the raw UTF-8 bytes; the special tokens follow (``bos_id`` 256 ... ``eot_id`` 261). A chat renders as::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|><|end_of_text|>

(one line, no newline between turns; message contents are stripped, as Llama 3 does).
:meth:`ByteTokenizer.save_hf_tokenizer` writes the same tokenizer as an HF ``tokenizer.json`` (byte-level BPE with
no merges) plus a Jinja ``chat_template`` that renders exactly these ids, so transformers and vLLM encode identically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

NUM_BYTES = 256

# Special tokens in id order (ids NUM_BYTES, NUM_BYTES + 1, ...). Names follow Llama 3 so chat tooling recognises them.
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKEN_NAMES = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)
DEFAULT_SPECIAL_TOKENS = {name: NUM_BYTES + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}

# The Jinja twin of ``tokenize_messages``: ``| trim`` is Python's ``str.strip()``, like ``_tokenize_body``.
# Without a generation prompt it closes with <|end_of_text|> (= add_end_tokens=True); with one it ends where the
# assistant's answer starts (= an empty assistant message tokenized with add_end_tokens=False).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] | trim + '<|end_header_id|>\n\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}"
    "{{- item['text'] | trim -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- else -%}{{- eos_token -}}{%- endif -%}"
)


class MessagesTransform(Transform):
    """Torchtune's tokenizer transform over a ``tokenize_messages(messages, add_end_tokens=...)``."""

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` with ``"tokens"`` and ``"mask"`` (Torchtune's tokenizer transform)."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


class ByteTokenizer(ModelTokenizer, MessagesTransform):
    """UTF-8 byte tokenizer: 256 byte ids followed by Llama-3-style special tokens.

    Args:
        special_tokens (Mapping[str, int] | None): id of each name in :data:`SPECIAL_TOKEN_NAMES`; ids must be
            distinct and >= 256. Default: :data:`DEFAULT_SPECIAL_TOKENS` (256..261).
        max_seq_len (int | None): truncate ``tokenize_messages`` output to this many tokens (Torchtune's
            ``truncate``: the last token becomes ``eos_id`` when end tokens are added). Default None.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi")
        [256, 104, 105, 257]
        >>> tok.decode([256, 104, 105, 257])
        'hi'
    """

    def __init__(self, special_tokens: Mapping[str, int] | None = None, max_seq_len: int | None = None) -> None:
        special_tokens = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        missing = [name for name in SPECIAL_TOKEN_NAMES if name not in special_tokens]
        if missing:
            raise ValueError(f"special_tokens is missing {missing}; it needs every name in {SPECIAL_TOKEN_NAMES}")
        ids = list(special_tokens.values())
        if len(set(ids)) != len(ids) or min(ids) < NUM_BYTES:
            raise ValueError(f"special_tokens ids must be distinct and >= {NUM_BYTES} (byte ids), got {special_tokens}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (room for bos and eos) or None, got {max_seq_len}")
        self.special_tokens = special_tokens
        self.max_seq_len = max_seq_len
        self.bos_id = special_tokens[BOS_TOKEN]
        self.eos_id = special_tokens[EOS_TOKEN]
        self.pad_id = special_tokens[PAD_TOKEN]
        self.start_header_id = special_tokens[START_HEADER_TOKEN]
        self.end_header_id = special_tokens[END_HEADER_TOKEN]
        self.eot_id = special_tokens[EOT_TOKEN]
        # Generation stops at end of turn or end of text, as for Llama 3.
        self.stop_tokens = [self.eos_id, self.eot_id]
        self._id_to_special = {i: name for name, i in special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (bytes + special tokens); the model's embedding may be larger."""
        return max(self._id_to_special) + 1

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encode ``text`` as its UTF-8 bytes (special-token names in ``text`` are plain text, never specials)."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD (as the HF byte-level decoder does).

        With ``skip_special_tokens=False`` special tokens appear by name. Ids outside the vocabulary raise.
        """
        text_parts: list[str] = []
        pending = bytearray()
        for token_id in token_ids:
            token_id = int(token_id)
            if 0 <= token_id < NUM_BYTES:
                pending.append(token_id)
                continue
            if token_id not in self._id_to_special:
                raise ValueError(f"token id {token_id} is not in the byte tokenizer's vocabulary")
            if not skip_special_tokens:
                text_parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                text_parts.append(self._id_to_special[token_id])
        text_parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(text_parts)

    def _tokenize_header(self, message: Message) -> list[int]:
        role = self.encode(message.role.strip(), add_bos=False, add_eos=False)
        return [self.start_header_id, *role, self.end_header_id, *b"\n\n"]

    def _tokenize_body(self, message: Message) -> list[int]:
        body: list[int] = []
        for item in message.content:
            if item["type"] != "text":
                raise ValueError(f"ByteTokenizer handles text messages only, got content type {item['type']!r}")
            body += self.encode(item["content"].strip(), add_bos=False, add_eos=False)
        return body

    def tokenize_message(
        self, message: Message, *, add_start_tokens: bool = True, add_end_tokens: bool = True
    ) -> list[int]:
        """Header (role), stripped content, and ``eot_id`` for one message."""
        header = self._tokenize_header(message) if add_start_tokens else []
        end = [self.eot_id] if add_end_tokens else []
        return header + self._tokenize_body(message) + end

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Tokenize a chat; same contract as Torchtune's ``Llama3Tokenizer.tokenize_messages``.

        Args:
            messages (list[Message]): the chat; ``message.masked`` marks tokens excluded from the loss.
            add_end_tokens (bool): close the last message with ``eot_id`` and the chat with ``eos_id``.
                False for generation (the prompt then ends inside the last, usually empty assistant, message).

        Returns:
            tuple[list[int], list[bool]]: ids and mask of the same length (True = not trained on; bos/eos are masked).
        """
        tokens = [self.bos_id]
        mask = [True]
        for i, message in enumerate(messages):
            is_last = i == len(messages) - 1
            ids = self.tokenize_message(message, add_end_tokens=add_end_tokens or not is_last)
            tokens += ids
            mask += [message.masked] * len(ids)
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(True)
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def save_hf_tokenizer(self, output_dir: str | Path) -> list[Path]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``output_dir``.

        ``AutoTokenizer.from_pretrained(output_dir)`` then encodes like :meth:`encode` with ``add_eos=False`` (HF
        adds only bos, as Llama 3 does, so completion prompts are not closed), decodes like :meth:`decode`, and
        ``apply_chat_template`` yields :meth:`tokenize_messages`' ids.

        Returns:
            list[Path]: the files written.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written = [output_dir / "tokenizer.json", output_dir / "tokenizer_config.json"]
        written.append(output_dir / "special_tokens_map.json")
        _build_hf_tokenizer(self.special_tokens).save(str(written[0]))
        special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "model_max_length": self.max_seq_len or 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        written[1].write_text(json.dumps(config, indent=2) + "\n")
        written[2].write_text(json.dumps(special_map, indent=2) + "\n")
        return written


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what HF's ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(NUM_BYTES):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(NUM_BYTES + extra)
            extra += 1
    return mapping


def _build_hf_tokenizer(special_tokens: Mapping[str, int]):
    """HF ``tokenizers`` twin: byte-level BPE without merges (byte b -> id b), specials as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    # Added tokens take the next free ids in order, so add them sorted by id and fill any gaps with padding names.
    by_id = sorted(special_tokens.items(), key=lambda item: item[1])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    next_id = NUM_BYTES
    for name, token_id in by_id:
        while next_id < token_id:  # unused id between specials: reserve it so ids stay aligned
            tokenizer.add_special_tokens([AddedToken(f"<|reserved_{next_id}|>", special=True, normalized=False)])
            next_id += 1
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        next_id += 1
    bos_id = special_tokens[BOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    for name, token_id in special_tokens.items():
        if tokenizer.token_to_id(name) != token_id:
            raise RuntimeError(f"HF tokenizer gave {name} id {tokenizer.token_to_id(name)}, expected {token_id}")
    return tokenizer


def _load_special_tokens(path: str | Path) -> dict[str, int]:
    """Read the special-token ids back from a ``tokenizer.json`` (or a directory holding one) we saved."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"byte_tokenizer path={str(path)!r} does not exist; pass a tokenizer.json written by "
            "ByteTokenizer.save_hf_tokenizer (or its directory), or path=None for the built-in tokenizer"
        )
    data = json.loads(path.read_text())
    vocab = (data.get("model") or {}).get("vocab") or {}
    expected_vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    if {k: v for k, v in vocab.items() if v < NUM_BYTES} != expected_vocab:
        raise ValueError(
            f"byte_tokenizer path={str(path)!r} is not a byte-level tokenizer (its vocab does not map the 256 bytes "
            "to ids 0..255); for a Llama-3 tokenizer use torchtune.models.llama3.llama3_tokenizer instead"
        )
    added = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    return {name: added[name] for name in SPECIAL_TOKEN_NAMES if name in added}


def byte_tokenizer(path: str | None = None, max_seq_len: int | None = None) -> ByteTokenizer:
    """Builder for :class:`ByteTokenizer`, usable from YAML as ``tokenizer: {_component_: ...byte_tokenizer}``.

    Args:
        path (str | None): a ``tokenizer.json`` (or its directory) written by ``save_hf_tokenizer``; its
            special-token ids are used. Default None: the built-in layout (specials at 256..261).
        max_seq_len (int | None): truncation length for ``tokenize_messages``. Default None.

    Returns:
        ByteTokenizer: the tokenizer.
    """
    special_tokens = None if path is None else _load_special_tokens(path)
    return ByteTokenizer(special_tokens=special_tokens, max_seq_len=max_seq_len)
