"""Conversation formats: how a list of messages becomes prompt, image and answer text segments.

A conversation is a list of ``{"role": ..., "content": ...}`` messages: an optional ``system``
message, then ``user`` and ``assistant`` turns alternating, user first. The first user message may
hold the image placeholder ``<image>`` once (a multi-turn dialogue carries one image); no other
message may. Contents are stripped of surrounding whitespace.

Each format renders a conversation into segments (docs/language.md shows every format rendered):

- ``prompt``: text the model reads (system text, the user turns, role headers);
- ``image``: the ``<image>`` placeholder, later replaced by the brain tokens;
- ``answer``: an assistant turn's text with its end-of-turn token: the only supervised text.

A conversation that ends with a user turn renders the assistant's header last, as the prompt
from which the model generates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation; kind is "prompt", "image" or "answer"."""

    text: str
    kind: str


def check_conversation(messages: Sequence[Mapping[str, str]]) -> None:
    """Raises ValueError naming the message and what was expected, unless ``messages`` is a
    conversation as described in this module's docstring."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages, got {type(messages).__name__}")
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ValueError(f"message {k}: expected exactly the keys 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise ValueError(f"message {k}: role must be one of {ROLES} and content a string, got {message!r}")
    offset = int(messages[0]["role"] == "system")
    if len(messages) == offset:
        raise ValueError("a conversation needs at least one user message after its system message")
    for k in range(offset, len(messages)):
        expected = "user" if (k - offset) % 2 == 0 else "assistant"
        if messages[k]["role"] != expected:
            raise ValueError(f"message {k}: role {messages[k]['role']!r}, expected {expected!r} (an optional system "
                             "message, then user and assistant turns alternating, user first)")
    for k, message in enumerate(messages):
        count = message["content"].count(IMAGE_PLACEHOLDER)
        if count > int(k == offset):
            where = "more than once" if k == offset else f"in a {message['role']} message"
            raise ValueError(f"message {k}: {IMAGE_PLACEHOLDER} appears {where}; a conversation carries one image, "
                             "in its first user message")


def _stripped(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    check_conversation(messages)
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def _begin_text(tokenizer) -> str:
    """The special tokens the tokenizer itself puts before a text (Llama's bos; none for GPT-2 style)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
    if not starts:
        raise ValueError(f"the tokenizer's own special tokens {full} do not surround its plain tokens {bare}")
    start = starts[0]
    return "".join(tokenizer.convert_ids_to_tokens(full[:start]))


def split_image(segments: Sequence[Segment]) -> list[Segment]:
    """Prompt segments split at ``<image>`` into prompt and image segments; adjacent prompt text merged
    (text the tokenizer must see whole), empty prompt text dropped."""
    out: list[Segment] = []
    for segment in segments:
        if segment.kind == "prompt":
            before, found, after = segment.text.partition(IMAGE_PLACEHOLDER)
            pieces = [Segment(before, "prompt")] + ([Segment(IMAGE_PLACEHOLDER, "image"), Segment(after, "prompt")]
                                                     if found else [])
        else:
            pieces = [segment]
        for piece in pieces:
            if piece.kind == "prompt" and out and out[-1].kind == "prompt":
                out[-1] = Segment(out[-1].text + piece.text, "prompt")
            elif piece.text:
                out.append(piece)
    return [s for s in out if s.text]


@dataclasses.dataclass(frozen=True)
class TemplateFormat:
    """A format written as text templates. ``{content}`` is the message's text, ``{bos}`` the special
    tokens the tokenizer itself prepends (Llama's ``<s>`` / ``<|begin_of_text|>``, nothing for
    GPT-2-style tokenizers), ``{eos}`` the tokenizer's eos token.

    begin: text before everything; system: a system message (None: the format has none), with
    default_system used when the conversation brings none; user: a user turn; assistant: the
    assistant's header (prompt); answer: the assistant's text and end-of-turn (supervised);
    special_tokens: tokens the tokenizer must hold as single tokens.
    """

    name: str
    begin: str
    system: str | None
    default_system: str | None
    user: str
    assistant: str
    answer: str
    special_tokens: tuple[str, ...] = ()

    def _fill(self, template: str, tokenizer, content: str = "") -> str:
        if "{eos}" in template and tokenizer.eos_token is None:
            raise ValueError(f"format {self.name!r} ends answers with the tokenizer's eos token, and this tokenizer "
                             "has none")
        if "{bos}" in template:
            template = template.replace("{bos}", _begin_text(tokenizer))
        return template.replace("{eos}", tokenizer.eos_token or "").replace("{content}", content)

    def _check_tokenizer(self, tokenizer) -> None:
        for token in self.special_tokens:
            if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
                raise ValueError(f"format {self.name!r} needs {token} as one special token; this tokenizer splits it "
                                 "(use a format made for this tokenizer, e.g. 'chat_template')")

    def render(self, messages: Sequence[Mapping[str, str]], tokenizer) -> list[Segment]:
        """The conversation's segments (see the module docstring)."""
        self._check_tokenizer(tokenizer)
        messages = _stripped(messages)
        segments = [Segment(self._fill(self.begin, tokenizer), "prompt")]
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else self.default_system
        if system is not None:
            if self.system is None:
                raise ValueError(f"format {self.name!r} has no system message; the conversation has one")
            segments.append(Segment(self._fill(self.system, tokenizer, system), "prompt"))
        for message in messages:
            if message["role"] == "user":
                segments.append(Segment(self._fill(self.user, tokenizer, message["content"]), "prompt"))
                segments.append(Segment(self._fill(self.assistant, tokenizer), "prompt"))
            else:
                segments.append(Segment(self._fill(self.answer, tokenizer, message["content"]), "answer"))
        return split_image(segments)


@dataclasses.dataclass(frozen=True)
class ChatTemplateFormat:
    """The tokenizer's own jinja ``chat_template``. Segments come from rendering prefixes of the
    conversation: before assistant turn k, the first k messages with the generation prompt; the
    answer is what rendering message k adds, up to and including the first special token after its
    content (its end-of-turn); what follows (e.g. a newline) belongs to the next prompt. Every
    rendering must extend the previous one, else the template is refused."""

    name: str = "chat_template"

    def render(self, messages: Sequence[Mapping[str, str]], tokenizer) -> list[Segment]:
        """The conversation's segments (see the module docstring)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("format 'chat_template': this tokenizer has no chat_template")
        messages = _stripped(messages)
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}

        def render(count: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(messages[:count], tokenize=False,
                                                 add_generation_prompt=generation_prompt)

        def extend(done: str, text: str, what: str) -> str:
            if not text.startswith(done):
                raise ValueError(f"format 'chat_template': the template's rendering of {what} does not extend its "
                                 f"rendering of the messages before, so answer spans cannot be cut exactly: "
                                 f"{done!r} vs {text!r}")
            return text[len(done):]

        segments, done = [], ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(k, True)
            segments.append(Segment(extend(done, prompt, f"messages 0..{k - 1} with the generation prompt"), "prompt"))
            added = extend(prompt, render(k + 1, False), f"messages 0..{k}")
            at = added.find(message["content"])
            if at < 0:
                raise ValueError(f"format 'chat_template': message {k}'s content does not appear in its rendering "
                                 f"{added!r}")
            ends = [added.find(t, at + len(message["content"])) for t in specials]
            ends = [(i, len(t)) for i, t in zip(ends, specials) if i >= 0]
            if not ends:
                raise ValueError(f"format 'chat_template': the template closes message {k} without a special "
                                 f"end-of-turn token: {added!r}")
            start, length = min(ends)
            segments.append(Segment(added[:start + length], "answer"))
            done = prompt + added[:start + length]
        ends_with_answer = messages[-1]["role"] == "assistant"
        segments.append(Segment(extend(done, render(len(messages), not ends_with_answer), "the conversation"),
                                "prompt"))
        return split_image(segments)


PAPER = TemplateFormat(
    name="paper", begin="{bos}", system=None, default_system=None,
    user="<human>: {content} ", assistant="<bot>:", answer=" {content}{eos}")
VICUNA_V1 = TemplateFormat(
    name="vicuna_v1", begin="{bos}", system="{content} ",
    default_system=("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    user="USER: {content} ", assistant="ASSISTANT:", answer=" {content}{eos}")
LLAMA3 = TemplateFormat(
    name="llama3", begin="<|begin_of_text|>", default_system=None,
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", answer="{content}<|eot_id|>",
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
CHAT_TEMPLATE = ChatTemplateFormat()
FORMATS = {f.name: f for f in (PAPER, LLAMA3, VICUNA_V1, CHAT_TEMPLATE)}


def get_format(name: str) -> TemplateFormat | ChatTemplateFormat:
    """A format by name: "paper", "llama3", "vicuna_v1" or "chat_template"."""
    if name not in FORMATS:
        raise ValueError(f"unknown conversation format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]
