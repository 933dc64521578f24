"""Embedded vocabulary for the offline haystack generator, one disjoint set per split.

Train and eval share no content word, name, filler template or needle template, so a model fine-tuned on the
``"train"`` split is evaluated on text it has never seen (only function words such as "the" overlap). The eval
passkey needle and question are the Landmark-Attention ones (Mohtashami & Jaggi, 2023).
"""

from dataclasses import dataclass


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


@dataclass(frozen=True)
class SplitVocabulary:
    """Everything the generator draws from for one split.

    Filler templates use the slots ``{adj} {noun} {noun2} {verb} {place}`` and, in decoy templates, ``{number}``
    (a value shaped like a needle value, so that the haystack holds plausible wrong answers). Needle templates are
    ``(needle sentence, question)`` pairs with ``{value}`` and, for key-value needles, ``{name}``.
    """

    intro: str
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    places: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    filler_templates: tuple[str, ...]
    decoy_templates: tuple[str, ...]
    passkey_templates: tuple[tuple[str, str], ...]
    kv_templates: tuple[tuple[str, str], ...]
    # Variety for long-context training; the generator draws from these when they are given.
    extra_intros: tuple[str, ...] = ()
    answer_cues: tuple[str, ...] = ("Answer:",)  # ends a plain-text (no chat template) prompt
    # Digits of needle values (and decoys), drawn per value; (5, 5) = the Landmark passkeys' five digits.
    value_digits: tuple[int, int] = (5, 5)

    def content_words(self) -> set[str]:
        """Lower-cased words of the word lists and name pools (used to check that splits are disjoint)."""
        pools = (self.adjectives, self.nouns, self.verbs, self.places, self.first_names, self.last_names)
        return {word.lower() for pool in pools for word in pool}


TRAIN = SplitVocabulary(
    # Short, so that byte-level CPU runs with a few hundred tokens of context keep room for filler.
    intro="Remember the facts hidden in this text.",
    adjectives=_words(
        "amber rusty gentle crooked silver narrow hollow bright woolen dusty polished wobbly faded sturdy "
        "tiny enormous velvet chipped fragrant muddy glossy patient noisy curious frozen golden scarlet "
        "tangled humble sleepy"
    ),
    nouns=_words(
        "kettle lantern sparrow wagon barrel ribbon pebble ladder violin teapot blanket compass basket "
        "bicycle candle feather hammer mirror pillow saddle thimble umbrella whistle anchor button carpet "
        "drum fiddle goose helmet"
    ),
    verbs=_words(
        "rattled drifted wandered glimmered tumbled hummed leaned rested creaked shivered wobbled dozed "
        "sparkled squeaked lingered swayed clattered waited glowed trembled"
    ),
    places=_words(
        "harbor orchard meadow bakery cellar station market barn workshop attic pantry courtyard "
        "riverbank greenhouse chapel stable lighthouse quarry vineyard boathouse"
    ),
    first_names=_words(
        "Adele Bruno Celia Dorian Edith Felix Greta Hugo Ingrid Jasper Kira Leon Mabel Nils Olga Pavel "
        "Rosa Stefan Tilda Viktor"
    ),
    last_names=_words(
        "Abernathy Brandt Castellano Dubois Eriksen Fontaine Gallagher Hartmann Ivanova Jensen Kowalski "
        "Lindqvist Moreau Novak Okafor Petrov"
    ),
    filler_templates=(
        "The {adj} {noun} {verb} beside the {place}.",
        "Every morning a {noun} {verb} near the {adj} {place}.",
        "Nobody expected the {noun} to be so {adj}.",
        "In the {place}, the {noun} {verb} for hours.",
        "A {adj} {noun} was seen close to the {place}.",
        "They said the {noun} {verb} with a {adj} {noun2}.",
        "By evening the {place} smelled of a {adj} {noun}.",
        "One {noun} and one {noun2} {verb} in the {place}.",
    ),
    decoy_templates=(
        "The {noun} in the {place} was labelled {number}.",
        "Shelf {number} of the {place} held a {adj} {noun}.",
        "A ticket numbered {number} was found under the {noun}.",
    ),
    passkey_templates=(
        ("The access number is {value}. Keep it in mind. {value} is the access number.", "What is the access number?"),
        (
            "The vault combination is {value}. Do not forget it. {value} is the vault combination.",
            "What is the vault combination?",
        ),
        ("Note this down: the door code is {value}.", "Which door code was mentioned?"),
        ("The lucky number for today is {value}.", "What is the lucky number for today?"),
        ("Write down the voucher number {value}; you will need it later.", "What was the voucher number?"),
        ("The password for the archive is {value}. Remember it well.", "What is the password for the archive?"),
        ("Attention: the confirmation number is {value}.", "Tell me the confirmation number."),
        ("The hidden identifier is {value}. {value} is the identifier to recall.", "Recall the hidden identifier."),
        ("Your reference code is {value}, as printed on the receipt.", "What reference code was printed?"),
        ("Memorize this PIN: {value}.", "What is the PIN you were asked to memorize?"),
        ("The winning ticket carries the number {value}.", "Which number does the winning ticket carry?"),
        ("Key fact: the serial to report is {value}.", "What serial should be reported?"),
        ("Among all of this, one thing matters: the code word is {value}.", "What is the code word?"),
        ("The unlock sequence reads {value}. It is important.", "What does the unlock sequence read?"),
    ),
    kv_templates=(
        ("The locker number of {name} is {value}.", "What is the locker number of {name}?"),
        ("{name} was given the badge number {value}.", "Which badge number was {name} given?"),
        ("The phone extension of {name} is {value}.", "Which extension has {name}?"),
        ("{name} keeps account {value}.", "Which account does {name} keep?"),
        ("Member {name} has number {value}.", "What number has member {name}?"),
        ("Package for {name}: tracking {value}.", "Tracking number for {name}?"),
        ("{name} booked room {value}.", "Which room did {name} book?"),
        ("Employee {name} has ID {value}.", "What is the ID of {name}?"),
        ("{name} chose the code {value}.", "What code did {name} choose?"),
        ("{name} holds permit {value}.", "Which permit does {name} hold?"),
    ),
    extra_intros=(  # no longer than ``intro``: byte-level configs of 256 tokens keep their filler
        "Read these notes; a question follows.",
        "Find the one detail that matters here.",
        "Keep the following text in memory.",
        "One fact below matters. Find it.",
        "Study this; you will be quizzed.",
    ),
    answer_cues=("Answer:", "The answer is", "A:", "Response:", "It is", "Reply with the number:", "Result:"),
    value_digits=(4, 7),  # a model that only ever copied five digits learned the format, not the retrieval
)

EVAL = SplitVocabulary(
    # Shorter than Landmark-Attention's introduction so that byte-level prompts of 256 tokens keep some filler.
    intro="Important information is buried in the text below.",
    adjectives=_words(
        "azure brittle cobalt dim elegant feeble gaunt hazy icy jagged keen lavish mossy nimble opaque "
        "pale quaint rigid stormy tepid vivid wary zesty bleak crisp drowsy earnest frail grim lucid"
    ),
    nouns=_words(
        "falcon tablet chisel quilt glacier parcel beacon cauldron satchel trumpet walrus spindle locket "
        "marble nozzle oyster pendant quiver rudder scroll trowel urn vase wreath yacht zipper banjo "
        "crate dagger easel"
    ),
    verbs=_words(
        "vanished gleamed faltered toppled loomed dangled flickered crumbled hovered rumbled shimmered "
        "slumbered stumbled twirled buzzed sagged drooped quivered bounced perched"
    ),
    places=_words(
        "canyon arcade bazaar citadel dockyard foundry garrison hangar infirmary jetty kiosk lagoon "
        "monastery observatory plaza rotunda sanatorium tavern warehouse zoo"
    ),
    first_names=_words(
        "Amara Benedikt Cosima Desmond Elif Florian Gwen Horatio Isolde Joaquin Kasimir Lucinda Matteo "
        "Noor Orla Quentin Rafaela Soren Thea Umberto"
    ),
    last_names=_words(
        "Achterberg Bianchi Carvalho Delacroix Esposito Fitzgerald Grunewald Haddad Ishikawa Jovanovic "
        "Kuznetsov Laurent Mbeki Nakamura Oyelaran Quispe"
    ),
    filler_templates=(
        "Beyond the {place} stood a {adj} {noun}.",
        "Someone claimed the {noun} {verb} long before dawn.",
        "Near the {adj} {place}, a {noun} {verb} quietly.",
        "The weather at the {place} was {adj}.",
        "Over the {place} a {adj} {noun} {verb} twice.",
        "Later, the {noun} {verb} next to the {adj} {noun2}.",
        "Travellers remember the {place} for its {adj} {noun}.",
        "At noon the {noun} and the {noun2} {verb}.",
    ),
    decoy_templates=(
        "Crate {number} at the {place} contained a {adj} {noun}.",
        "The {noun} carried the serial {number}.",
        "Gate {number} of the {place} stayed {adj} all week.",
    ),
    passkey_templates=(("The pass key is {value}. Remember it. {value} is the pass key.", "What is the pass key?"),),
    kv_templates=(("The secret code of {name} is {value}.", "What is the secret code of {name}?"),),
    answer_cues=("The value is",),
)

VOCABULARIES = {"train": TRAIN, "eval": EVAL}
