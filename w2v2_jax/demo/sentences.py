"""A shipped word list and sentence templates for the offline eSpeak corpus (lowercase letters only)."""

from __future__ import annotations

WORDS = {
  "adj": "red green blue yellow small large quiet loud happy sad bright dark cold warm old young "
  "heavy light quick slow soft sharp clean dirty empty full early late tall short rich poor "
  "gentle brave calm strange simple famous hungry tired busy lucky",
  "noun": "cat dog bird horse fish farmer teacher doctor child river mountain garden window table "
  "letter story song boat train city village forest island bridge kitchen market school "
  "doctor painter sailor baker lamp clock apple orange bread water stone paper basket "
  "candle coat hat ship road field cloud",
  "nouns": "cats dogs birds horses farmers teachers children rivers gardens windows tables letters "
  "stories songs boats trains cities villages islands bridges apples oranges stones papers "
  "baskets candles ships roads fields clouds",
  "verb": "see find carry paint build open close watch follow visit clean move sell buy bring "
  "read write draw catch hold fix wash cook climb cross",
  "past": "saw found carried painted built opened closed watched followed visited cleaned moved "
  "sold bought brought read wrote drew caught held fixed washed cooked climbed crossed",
  "place": "park station harbor valley library kitchen garden market village square museum beach "
  "hospital office farm castle",
  "name": "anna peter maria john laura david emma thomas sofia daniel clara martin julia oliver nora samuel",
  "num": "two three four five six seven eight nine ten eleven twelve twenty",
  "time": "today yesterday tomorrow tonight later again soon",
  "adv": "slowly quickly quietly carefully happily suddenly gently loudly",
}
WORDS = {k: tuple(dict.fromkeys(v.split())) for k, v in WORDS.items()}

TEMPLATES = (
  "the {adj} {noun} {past} the {noun}",
  "{name} {past} the {adj} {noun} near the {place}",
  "{name} and {name} will {verb} {num} {nouns} {time}",
  "a {adj} {noun} {past} {adv} across the {place}",
  "did the {noun} {verb} the {adj} {noun} {time}",
  "we {past} {num} {adj} {nouns} in the {place}",
  "please {verb} the {noun} before the {adj} {noun} comes",
  "the {nouns} in the {place} are {adj} and {adj}",
  "{name} {past} a {noun} and {past} it {adv}",
  "there were {num} {nouns} by the {adj} {noun} {time}",
  "why did {name} {verb} the {noun} in the {place}",
  "my {adj} {noun} {past} {adv} to the {place}",
)


def sentence(rng) -> str:
  """One random sentence; `rng` is a numpy Generator."""
  template = TEMPLATES[rng.integers(len(TEMPLATES))]
  out, rest = [], template
  while "{" in rest:
    head, _, tail = rest.partition("{")
    key, _, rest = tail.partition("}")
    out.append(head)
    choices = WORDS[key]
    out.append(choices[rng.integers(len(choices))])
  out.append(rest)
  return "".join(out)
