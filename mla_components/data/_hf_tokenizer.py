"""A real model's HF tokenizer (``tokenizer.json`` + its Jinja chat template) as a Torchtune ``ModelTokenizer``.

Torchtune 0.6.1 has only ``HuggingFaceBaseTokenizer`` (``encode``/``decode`` over ``tokenizer.json``); its
``HuggingFaceModelTokenizer`` (chat templates) came later. :class:`HFModelTokenizer` adds what the recipes and the
needle datasets need on top of it: ``tokenize_messages`` renders the checkpoint's own chat template (SmolLM2:
ChatML) exactly as transformers' ``apply_chat_template`` does, so the ids are identical, and marks each token with
the ``masked`` flag of the message that produced it (``train_on_input=False`` masks the prompt).
"""

from __future__ import annotations

import bisect
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

from mla_components.data._tokenizer import MessagesTransform

_TEMPLATE_FILE = "chat_template.jinja"


def _compile_template(source: str):
    """Compile a chat template in the sandboxed Jinja environment transformers uses (same options and helpers)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class HFModelTokenizer(ModelTokenizer, MessagesTransform):
    """Torchtune ``ModelTokenizer`` + ``Transform`` over an HF ``tokenizer.json`` and its chat template.

    Args:
        tokenizer_json_path (str): the ``tokenizer.json``.
        tokenizer_config_json_path (str | None): ``tokenizer_config.json`` (bos/eos/pad token names, and the
            ``chat_template`` unless ``chat_template.jinja`` sits next to ``tokenizer.json``).
        generation_config_path (str | None): ``generation_config.json`` (its ``eos_token_id`` list joins
            ``stop_tokens``). At least one of the two configs is needed (to find bos/eos).
        max_seq_len (int | None): truncate ``tokenize_messages`` output to this length. Default None.

    Attributes:
        bos_id, eos_id, pad_id (int): special ids (pad: the config's ``pad_token``, else ``eos_id``).
        stop_tokens (list[int]): ids that end generation: ``eos_id`` and the generation config's ``eos_token_id``.
        vocab_size (int): ids the tokenizer can produce, added tokens included.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: str | None = None,
        generation_config_path: str | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        self.base = HuggingFaceBaseTokenizer(
            tokenizer_json_path,
            tokenizer_config_json_path=tokenizer_config_json_path,
            generation_config_path=generation_config_path,
        )
        self.max_seq_len = max_seq_len
        config = self.base.config or {}
        template_file = Path(tokenizer_json_path).parent / _TEMPLATE_FILE
        source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            raise ValueError(
                f"tokenizer at {tokenizer_json_path} has no chat template: neither {_TEMPLATE_FILE} next to it nor "
                "chat_template in tokenizer_config.json (an instruct model's tokenizer files are needed)"
            )
        self.chat_template = source
        self._template = _compile_template(source)
        # What transformers passes to the template besides the messages: the special tokens by name.
        self._special_tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if config.get(key) is not None:
                self._special_tokens[key] = self.base._get_token_from_config(config, key)
        self.bos_id = self.base.bos_id
        self.eos_id = self.base.eos_id
        pad = self._special_tokens.get("pad_token")
        pad_id = None if pad is None else self.base.tokenizer.token_to_id(pad)
        if pad_id is None and self.base.generation_config:
            pad_id = self.base.generation_config.get("pad_token_id")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        stop = (self.base.generation_config or {}).get("eos_token_id")
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        self.stop_tokens = sorted({self.eos_id, *stop})

    @property
    def vocab_size(self) -> int:
        return self.base.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Plain text -> ids (special-token names in ``text`` become their ids, as in HF)."""
        return self.base.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.base.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (= ``apply_chat_template(..., tokenize=False)``)."""
        chat = [{"role": m.role, "content": m.text_content} for m in messages]
        return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **self._special_tokens)

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Tokenize a chat with the checkpoint's chat template; Torchtune's ``tokenize_messages`` contract.

        With ``add_end_tokens`` the ids are those of ``apply_chat_template(messages)``. Without (generation), the
        last message is left open: if it is the assistant's, the ids are ``apply_chat_template(messages[:-1],
        add_generation_prompt=True)`` followed by its content (the prompt ends where the answer continues);
        otherwise ``apply_chat_template(messages, add_generation_prompt=True)``.

        Args:
            messages (list[Message]): the chat; ``message.masked`` marks tokens excluded from the loss.
            add_end_tokens (bool): close the chat as in training data. Default True.

        Returns:
            tuple[list[int], list[bool]]: ids and mask of the same length. A token's mask is the ``masked`` of the
            message whose rendered text (role header, content, end-of-turn token; the template's default system
            prompt counts as the first message's) it starts in.

        Raises:
            ValueError: if the template does not render a chat as the concatenation of its growing prefixes (the
                per-message masks would be undefined).
        """
        if not messages:
            return [], []
        open_last = not add_end_tokens and messages[-1].role == "assistant"
        closed = messages[:-1] if open_last else messages
        add_prompt = not add_end_tokens
        text = self.render(closed, add_generation_prompt=add_prompt)
        # Character offset where each message's text ends (the last one ends at the end of the text).
        # (an open last message's span starts after the messages before it, so it holds the generation prompt).
        ends = []
        for i in range(1, len(closed) + open_last):
            prefix = self.render(closed[:i])
            if not text.startswith(prefix):
                raise ValueError(
                    "the tokenizer's chat template does not render a chat as the concatenation of its messages, so "
                    f"per-message loss masks are undefined (message {i - 1} renders differently once followed)"
                )
            ends.append(len(prefix))
        if open_last:
            text += messages[-1].text_content
        encoding = self.base.tokenizer.encode(text, add_special_tokens=False)
        tokens = list(encoding.ids)
        last = len(messages) - 1
        mask = [messages[min(bisect.bisect_right(ends, start), last)].masked for start, _ in encoding.offsets]
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask


def hf_tokenizer(path: str, max_seq_len: int | None = None) -> HFModelTokenizer:
    """Builder for :class:`HFModelTokenizer`, usable from YAML as ``tokenizer: {_component_: ...hf_tokenizer}``.

    Args:
        path (str): an HF model or tokenizer directory (``tokenizer.json``, ``tokenizer_config.json`` and/or
            ``generation_config.json``, chat template), or its ``tokenizer.json``. ``write_origin`` and the
            checkpointers write such directories.
        max_seq_len (int | None): truncation length for ``tokenize_messages``. Default None.

    Returns:
        HFModelTokenizer: the tokenizer.

    Raises:
        FileNotFoundError: naming ``path`` and the missing file.
    """
    path = Path(path)
    directory = path.parent if path.name.endswith(".json") else path
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"tokenizer path={str(path)!r} has no tokenizer.json; point it at an HF model directory (e.g. one "
            "written by `python -m mla_components.conversion.origin --output DIR`)"
        )
    config = directory / "tokenizer_config.json"
    generation = directory / "generation_config.json"
    if not config.is_file() and not generation.is_file():
        raise FileNotFoundError(
            f"tokenizer path={str(path)!r} has neither tokenizer_config.json nor generation_config.json (needed for "
            "the bos/eos tokens)"
        )
    return HFModelTokenizer(
        str(tokenizer_json),
        tokenizer_config_json_path=str(config) if config.is_file() else None,
        generation_config_path=str(generation) if generation.is_file() else None,
        max_seq_len=max_seq_len,
    )
