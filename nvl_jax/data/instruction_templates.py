"""The templates of the offline instruction builder (nvl_jax.data.instructions), one function per kind.

Each kind turns a stimulus's captions and objects into one conversation (a list of user / assistant
messages, ``<image>`` opening the first user message), drawing its choices from ``rng``.
docs/language.md shows each with an example. The brief and detailed instructions are the paper's
Tables 3 and 4 (LLaVA's lists, extended); the SD-prompt and concept-localization instructions
are its Tables 5 and 6.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from nvl_jax.data.synthetic.scenes import CELL_NAMES, GRID

KINDS = ("brief", "detailed", "dialogue", "reasoning", "sd_prompt", "concept")
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Provide a brief description of the image.", "Describe the image briefly.", "Summarize the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.")
DETAILED_INSTRUCTIONS = (
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
    "Offer a detailed description of the image.", "Describe the image in detail.",
    "Offer a thorough analysis of the image.", "Provide a detailed explanation of the subsequent image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.", "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.", "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.", "Explain the image in detail.",
    "Examine the image closely and share its details.", "Write an exhaustive depiction of the given image.")
SD_PROMPT_INSTRUCTION = "Provide the corresponding Stable Diffusion prompts for the image."
CONCEPT_INSTRUCTION = 'Locating the concept of "{concept}"'
# The SD prompt's closing style words, by dataset.json source (others: "nsd"'s).
SD_STYLES = {"in-silico": "flat simple shapes, plain gray background, high contrast",
             "nsd": "photograph, realistic, highly detailed, natural lighting"}
# Objects named one by one in a detailed description; a crowded COCO image lists the rest only in its inventory.
MAX_DETAILED_OBJECTS = 6
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
                      "knife": "knives"}


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a stimulus: name ("circle", "dog"), colour (None when unknown, as in COCO),
    centre (x, y) as fractions of the image width and height, area as a fraction of the image."""

    name: str
    colour: str | None
    centre: tuple[float, float]
    area: float

    @property
    def label(self) -> str:
        return f"{self.colour} {self.name}" if self.colour else self.name

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the 3 x 3 grid the centre falls in."""
        x, y = self.centre
        return min(int(y * GRID), GRID - 1), min(int(x * GRID), GRID - 1)

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]


def plural(noun: str) -> str:
    """English plural of a COCO category or a shape ("traffic light" -> "traffic lights", "bus" -> "buses")."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        last = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def counted(n: int, noun: str, *, exact: bool = False) -> str:
    """"a dog" ("one dog" when ``exact``), "three dogs", "12 dogs", "no dogs"."""
    if n == 1:
        return f"one {noun}" if exact else f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {plural(noun)}"


def listing(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def inventory(objects: Sequence[SceneObject]) -> str:
    """"two red circles and a blue star": each label counted, in order of first appearance."""
    labels = [o.label for o in objects]
    unique = list(dict.fromkeys(labels))
    return listing([counted(labels.count(label), label) for label in unique])


def _unique(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """The objects whose label no other object shares (those a question can name)."""
    labels = [o.label for o in objects]
    return [o for o in objects if labels.count(o.label) == 1]


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b, along the axis where their centres differ most."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _ask(instruction: str) -> dict[str, str]:
    return {"role": "user", "content": f"<image>\n{instruction}"}


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def brief(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, **_) -> list[dict]:
    """One of the paper's 14 brief instructions; one caption."""
    return [_ask(rng.choice(BRIEF_INSTRUCTIONS)), _answer(captions[rng.integers(len(captions))])]


def detailed(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, **_) -> list[dict]:
    """One of the paper's 20 detailed instructions; every caption (in random order), the object inventory
    and where each nameable object is."""
    sentences = list(dict.fromkeys(_sentence(captions[i]) for i in rng.permutation(len(captions))))
    if objects:
        sentences.append(f"In total, the image shows {inventory(objects)}.")
        sentences += [f"The {o.label} is {o.where}." for o in _unique(objects)[:MAX_DETAILED_OBJECTS]]
    return [_ask(rng.choice(DETAILED_INSTRUCTIONS)), _answer(" ".join(sentences))]


def _dialogue_rounds(objects: Sequence[SceneObject], vocabulary: Sequence[str],
                     rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question the objects answer: what is there, counts (one present, one absent name), colours,
    positions and one relation."""
    names = list(dict.fromkeys(o.name for o in objects))
    rounds = [("What objects can you see in the image?",
               f"I can see {inventory(objects)}." if objects else "I cannot make out any distinct object.")]
    if names:
        name = names[rng.integers(len(names))]
        n = sum(o.name == name for o in objects)
        rounds.append((f"How many {plural(name)} are there in the image?",
                       f"There {'is' if n == 1 else 'are'} {counted(n, name, exact=True)}."))
    absent = [v for v in vocabulary if v not in names]
    if absent:
        name = absent[rng.integers(len(absent))]
        rounds.append((f"How many {plural(name)} are there in the image?",
                       f"There are no {plural(name)} in the image."))
    by_name = [o for o in objects if o.colour and sum(p.name == o.name for p in objects) == 1]
    if by_name:
        o = by_name[rng.integers(len(by_name))]
        rounds.append((f"What colour is the {o.name}?", f"The {o.name} is {o.colour}."))
    nameable = _unique(objects)
    if nameable:
        o = nameable[rng.integers(len(nameable))]
        rounds.append((f"Where is the {o.label} in the image?", f"The {o.label} is {o.where}."))
    if len(nameable) >= 2:
        a, b = (nameable[i] for i in rng.choice(len(nameable), 2, replace=False))
        rounds.append((f"Where is the {a.label} relative to the {b.label}?",
                       f"The {a.label} is {_relation(a, b)} the {b.label}."))
    return rounds


def dialogue(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, *,
             vocabulary: Sequence[str], **_) -> list[dict]:
    """Two to four rounds of questions on objects, counts, colours and positions, in random order."""
    rounds = _dialogue_rounds(objects, vocabulary, rng)
    chosen = rng.permutation(len(rounds))[:min(len(rounds), int(rng.integers(2, 5)))]
    messages = []
    for k, index in enumerate(chosen):
        question, answer = rounds[index]
        messages += [_ask(question) if k == 0 else {"role": "user", "content": question}, _answer(answer)]
    return messages


def _reasoning_options(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    n = len(objects)
    amount = ("No, it is sparse" if n <= 2 else "Not really, it is moderately filled" if n <= 5 else "Yes, it is busy")
    options = [("Is this a crowded scene? Explain your answer.",
                f"{amount}: it shows {inventory(objects) if objects else 'no distinct object'}.")]
    nameable = _unique(objects)
    if nameable:
        o = nameable[rng.integers(len(nameable))]
        rest = [p for p in objects if p is not o]
        options.append((f"If the {o.label} were taken out of the scene, what would remain?",
                        f"Only {inventory(rest)} would remain, {counted(n - 1, 'object')} of the {n}."
                        if rest else f"Nothing would remain: the {o.label} is the only object in the image."))
    largest = sorted(objects, key=lambda o: -o.area)
    if len(largest) >= 2 and largest[0].area > largest[1].area and largest[0] in nameable:
        o = largest[0]
        options.append(("Which object stands out the most, and why?",
                        f"The {o.label} stands out the most: it is the largest object in the image, {o.where}."))
    sides = [[o for o in objects if o.cell[1] == column] for column in (0, GRID - 1)]
    if objects and any(sides):
        left, right = len(sides[0]), len(sides[1])
        more = counted(max(left, right), "object", exact=True)
        fewer = "none" if min(left, right) == 0 else counted(min(left, right), "object", exact=True)
        verdict = ("Neither: both halves hold the same number of objects." if left == right else
                   f"The {'left' if left > right else 'right'} half: it holds {more} against {fewer} on the other "
                   "side.")
        options.append(("Which side of the image is busier, the left or the right?", verdict))
    coloured = [o for o in nameable if o.colour]
    if len(coloured) >= 2:
        colours = {o.colour for o in coloured}
        options.append(("Do the objects share one colour?",
                        f"Yes: they are all {coloured[0].colour}." if len(colours) == 1 else
                        "No: " + listing([f"the {o.name} is {o.colour}" for o in coloured]) + "."))
    return options


def reasoning(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, **_) -> list[dict]:
    """One templated question that combines several facts of the scene, with its reasoned answer."""
    options = _reasoning_options(objects, rng)
    question, answer = options[rng.integers(len(options))]
    return [_ask(question), _answer(answer)]


def sd_prompt(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, *,
              source: str, **_) -> list[dict]:
    """The paper's reconstruction instruction; a prompt: a caption, the object labels, the source's style."""
    parts = [captions[rng.integers(len(captions))].strip().rstrip(".")]
    parts += list(dict.fromkeys(o.label for o in objects))
    parts.append(SD_STYLES.get(source, SD_STYLES["nsd"]))
    return [_ask(SD_PROMPT_INSTRUCTION), _answer(", ".join(parts))]


def concepts(objects: Sequence[SceneObject]) -> list[str]:
    """The concepts a stimulus shows: its object names, then its colours (the in-silico concepts)."""
    return list(dict.fromkeys([o.name for o in objects] + [o.colour for o in objects if o.colour]))


def concept(captions: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator, **_) -> list[dict]:
    """The paper's localization instruction on a concept the stimulus shows; the answer is the concept."""
    shown = concepts(objects)
    if not shown:
        return []
    name = shown[rng.integers(len(shown))]
    return [_ask(CONCEPT_INSTRUCTION.format(concept=name)), _answer(name)]


BUILDERS = {"brief": brief, "detailed": detailed, "dialogue": dialogue, "reasoning": reasoning,
            "sd_prompt": sd_prompt, "concept": concept}
