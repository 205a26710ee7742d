"""Chat with the brain-language model about one fMRI recording:
``python -m nvl_jax.chat --workdir=RUN --subject subj01 --stimulus ID`` (or ``--trial N``).

RUN is a stage-2 run folder. ``--stimulus`` uses the subject's repeats of that stimulus averaged
(multi-trial); ``--trial`` one trial, by its index in the subject's trial list (single-trial). The
recording's brain tokens stand in for the image in the first turn; every later turn sees the whole
dialogue. Type a message after ``you>``; an empty line or end of input ends the chat. ``--message``
(repeatable) sends messages without a terminal. ``Locating the concept of "X"`` answers with the
concept's map on the subject's voxels, written as NIfTI and PNG under ``--out``.
"""

from __future__ import annotations

from collections.abc import Iterator
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_SUBJECT = flags.DEFINE_string("subject", "subj01", "the subject whose recording is shown")
_STIMULUS = flags.DEFINE_integer("stimulus", None, "stimulus id: the subject's repeats of it, averaged")
_TRIAL = flags.DEFINE_integer("trial", None, "one trial, by its index in the subject's trials")
_MESSAGE = flags.DEFINE_multi_string("message", None, "messages to send in order, instead of reading the terminal")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "longest answer, in tokens")
_OUT = flags.DEFINE_string("out", "chat_maps", "where concept maps go")


def _terminal() -> Iterator[str]:
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from nvl_jax.language import session

    messages = _MESSAGE.value if _MESSAGE.value else _terminal()
    for reply in session.chat(_WORKDIR.value, _SUBJECT.value, messages, stimulus=_STIMULUS.value,
                              trial=_TRIAL.value, max_new_tokens=_MAX_NEW_TOKENS.value, out=_OUT.value):
        print(f"model> {reply}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
