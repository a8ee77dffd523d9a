"""Built-in English sentences for the synthetic talking-face corpus.

``SENTENCES`` is a fixed, deterministic tuple (no randomness at import): hand-written sentences
chosen to exercise every mouth shape (bilabials p/b/m, labiodentals f/v, dentals th, rounded
vowels, wide open vowels, sibilants), plus sentences built from a few natural templates and word
lists with a fixed-seed generator. Lengths range from two words to long compound sentences so that
utterances vary from about one to several seconds.
"""
from __future__ import annotations

import random

import numpy as np

_HANDWRITTEN = (
    "Hello there.",
    "Yes, please.",
    "No, thank you.",
    "Good morning, everyone.",
    "Why not?",
    "Maybe later.",
    "Pass me the butter, please.",
    "Bob bought a big blue boat.",
    "My mother made maple muffins on Monday.",
    "Peter picked a pepper from the pot.",
    "Five fat frogs fell off the fence.",
    "Vivian visited the valley in the van.",
    "Think of three things that you thank them for.",
    "This is the thing that they threw over there.",
    "Sheila should shut the shop at six.",
    "Choose the cheese that Charles chose.",
    "Judge the jam jars by their jagged lids.",
    "Sue sells sea shells by the shore.",
    "Who knew you would move to the blue room?",
    "Owen wore a warm wool coat.",
    "The cat sat on a flat black mat.",
    "I saw a large yacht far out on the water.",
    "Keep the green tea in the deep freezer.",
    "It is easy to see the sea from here.",
    "Ruth threw the ball to the youth on the roof.",
    "Go slowly over the old stone road.",
    "Our cow found a brown owl in the tower.",
    "Wait here for eight minutes, then phone me.",
    "The boy enjoyed his toy in the noisy choir.",
    "Loud music can hurt your ears.",
    "Please remember to lock the back door.",
    "We will meet again at noon by the fountain.",
    "How much water do you drink every day?",
    "The weather forecast promised rain for the weekend.",
    "She plays the violin beautifully.",
    "Could you open the window a little?",
    "The museum opens at nine in the morning.",
    "A gentle breeze moved the leaves of the old oak tree.",
    "Every morning he walks his dog along the river.",
    "The train to Boston leaves from platform four.",
    "I would like a cup of coffee with milk, but no sugar.",
    "Thank you very much for your help yesterday.",
    "The children laughed as the puppy chased its tail.",
    "Before you leave, switch off the lights in the kitchen.",
    "Numbers like seven, eleven and twelve are easy to say.",
    "What a wonderful view of the mountains!",
    "They measured the width of the bridge with a rope.",
    "Fresh bread smells much better than stale toast.",
    "The pilot spoke calmly while the plane shook in the storm.",
    "My brother moved to a small village by the bay.",
    "We usually have fish and chips on Friday.",
    "Is this the way to the library?",
    "The old photograph showed my grandfather as a young man.",
    "Please speak a bit more slowly.",
    "Quick! Move the vase before it falls.",
    "Both of them thought the theatre was marvellous.",
    "The zebra and the giraffe drank from the same pool.",
    "Measure twice and cut once.",
    "A journey of a thousand miles begins with a single step.",
    "Birds build their nests high in the branches.",
    "He whispered something, but nobody heard what he said.",
    "The computer restarted without any warning.",
    "Put the purple pencils back in the box.",
    "Oh, I almost forgot about the meeting!",
    "When the sun went down, the air became cool and damp.",
    "The map shows a path through the woods to the beach.",
    "Vera values her freedom above everything else.",
    "Thirty thousand people gathered in the square.",
    "You should always wash your hands before you eat.",
    "The robot lifted the heavy box with ease.",
    "Mum and Dad are coming home at about five.",
    "I'm not sure whether it will work, but let's try.",
    "The moon was full and bright over the quiet harbour.",
    "If you need anything, just give me a call.",
    "Ninety-nine balloons floated up into the blue sky.",
    "My favourite food is mushroom soup with warm bread.",
    "The doctor asked him to breathe in deeply.",
    "Books, pens and paper were scattered across the floor.",
    "The ferry was delayed because of the fog.",
    "Who would have thought it could be so simple?",
)

# Templates: each slot is filled from the lists below by a fixed enumeration (see _generated).
_PEOPLE = ("my neighbour", "the teacher", "our captain", "the old farmer", "my cousin", "the pilot",
           "a young doctor", "the baker", "my sister", "the mayor", "a friendly waiter",
           "the museum guide", "my uncle", "the new student", "a tired nurse", "the gardener")
_NAMES = ("Maria", "Thomas", "Fiona", "Victor", "Paula", "Bobby", "Ruth", "Oliver", "Sophie",
          "Jack", "Wendy", "Marcus", "Chloe", "Martin", "Zoe", "Hugh")
_OBJECTS = ("a blue umbrella", "the morning paper", "a heavy suitcase", "some fresh vegetables",
            "a pair of boots", "the wooden chair", "a bunch of flowers", "the broken phone",
            "a map of the city", "two cups of tea", "a box of matches", "the violin case",
            "a warm blanket", "the shopping list", "a bottle of water", "the photo album")
_PLACES = ("the station", "the market", "the harbour", "the village square", "the office",
           "the beach", "the bakery", "the park", "the bridge", "the hospital", "the library",
           "the mountain hut", "the bus stop", "the garden", "the old mill", "the football ground")
_TIMES = ("this morning", "last night", "on Thursday", "after lunch", "every weekend",
          "before dawn", "in the evening", "at half past three", "yesterday afternoon",
          "next Monday", "during the summer", "at midnight")
_VERBS_PAST = ("carried", "brought", "took", "moved", "sent", "returned", "delivered", "dragged",
               "rushed", "posted", "wheeled", "mailed")  # all take "<object> to <place>"
_ADJ = ("beautiful", "quiet", "crowded", "chilly", "peaceful", "noisy", "foggy", "bright",
        "windy", "lovely", "gloomy", "busy")
_FEELINGS = ("happy", "worried", "surprised", "proud", "nervous", "curious", "thankful", "bored")

_TEMPLATES = (
    "{Person} {verb} {obj} to {place} {time}.",
    "Did {name} leave {obj} at {place}?",
    "{Name} felt {feeling} when {person} arrived {time}.",
    "It was a {adj} day at {place}, so {name} stayed a little longer.",
    "{Time_cap}, {name} walked to {place} and met {person}.",
    "Have you seen {obj}? I think {name} left it near {place}.",
    "{Name} said that {place} looks {adj} today.",
    "Why did {person} look so {feeling}?",
    "Please ask {name} to bring {obj}.",
    "Could you fetch {obj} from {place} before {name} gets back?",
    "Both {person} and {name} think {place} is too {adj}.",
    "We waited at {place} for {name}, but the weather was {adj}.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _generated(n: int) -> list[str]:
    """``n`` distinct template sentences. Slots are filled by a private, fixed-seed generator, so
    the list is the same on every run and Python version (``Random.choice`` on an int seed is
    stable); the caller's random state is never touched."""
    gen = random.Random(2603_20307)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):  # bounded: the slot lists allow far more than n distinct sentences
        if len(out) == n:
            break
        time = gen.choice(_TIMES)
        s = gen.choice(_TEMPLATES).format(
            Person=_cap(gen.choice(_PEOPLE)), person=gen.choice(_PEOPLE),
            Name=gen.choice(_NAMES), name=gen.choice(_NAMES), verb=gen.choice(_VERBS_PAST),
            obj=gen.choice(_OBJECTS), place=gen.choice(_PLACES), time=time, Time_cap=_cap(time),
            adj=gen.choice(_ADJ), feeling=gen.choice(_FEELINGS),
        )
        if s not in seen:
            seen.add(s)
            out.append(s)
    if len(out) < n:
        raise RuntimeError(f"templates gave only {len(out)} distinct sentences, {n} wanted")
    return out


SENTENCES: tuple[str, ...] = tuple(dict.fromkeys(_HANDWRITTEN + tuple(_generated(420))))


def sentence(rng: random.Random | np.random.Generator) -> str:
    """One sentence from ``SENTENCES``, drawn with ``rng`` (``random.Random`` or numpy Generator)."""
    if isinstance(rng, random.Random):
        return SENTENCES[rng.randrange(len(SENTENCES))]
    if isinstance(rng, np.random.Generator):
        return SENTENCES[int(rng.integers(len(SENTENCES)))]
    raise ValueError(f"rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}")


def passage(rng: random.Random | np.random.Generator, n_sentences: int) -> str:
    """``n_sentences`` sentences drawn with ``rng``, joined into one text (longer utterances)."""
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or n_sentences < 1:
        raise ValueError(f"n_sentences must be a positive integer, got {n_sentences!r}")
    return " ".join(sentence(rng) for _ in range(n_sentences))
