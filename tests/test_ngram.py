"""The ARPA n-gram estimator: a normalised interpolated Kneser-Ney model that KenLM reads and scores
exactly as we do, and the corpus's LM text, which holds no test sentence."""

import itertools

import kenlm
import numpy as np
import pytest

from w2v2_jax.decoding import ngram
from w2v2_jax.demo import corpus

SENTENCES = [
  "the cat saw the dog",
  "the dog saw a cat",
  "a cat and a dog",
  "the red cat saw the blue dog today",
  "we saw two cats",
  "the dog and the cat saw two birds",
]


def _log10p(tables, history, word):
  """Backoff scoring of the ARPA tables, written out: the seen n-gram, else backoff weight x lower order."""
  history = tuple(history)[-(len(tables) - 1) :] if len(tables) > 1 else ()
  gram = history + (word,)
  if gram in tables[len(gram) - 1]:
    return tables[len(gram) - 1][gram][0]
  if not history:
    return tables[0][(ngram.UNK,)][0]
  return tables[len(history) - 1].get(history, (0.0, 0.0))[1] + _log10p(tables, history[1:], word)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_is_a_distribution(order):
  tables = ngram.estimate(SENTENCES, order)
  vocab = [g[0] for g in tables[0] if g[0] != ngram.BOS]
  contexts = [(ngram.BOS,), (ngram.BOS, "the"), ("the", "cat"), ("saw",), ("zebra",), ("cat", "and", "a"), ()]
  for h in contexts:
    total = sum(10 ** _log10p(tables, h, w) for w in vocab)
    assert total == pytest.approx(1.0, abs=1e-9), (h, total)
  # Kneser-Ney, not counts: "dog" follows many words, "today" one, so "dog" gets more unigram mass
  # even where raw counts would tie them.
  assert _log10p(tables, ("zebra",), "dog") > _log10p(tables, ("zebra",), "today")


def test_kenlm_reads_the_arpa_and_scores_like_the_tables(tmp_path):
  path = ngram.build_arpa(SENTENCES, str(tmp_path / "lm.arpa"), order=3)
  tables = ngram.estimate(SENTENCES, 3)
  model = kenlm.Model(path)
  assert model.order == 3
  for text in ["the cat saw a dog", "a zebra saw the cat", "cats and dogs", "the dog"]:
    words = [ngram.BOS] + text.split() + [ngram.EOS]
    ours = sum(_log10p(tables, words[max(0, i - 2) : i], words[i]) for i in range(1, len(words)))
    assert model.score(text, bos=True, eos=True) == pytest.approx(ours, abs=1e-4), text
  # A sentence seen in training scores higher than the same words shuffled.
  assert model.score("the cat saw the dog") > model.score("dog the saw cat the")


def test_corpus_lm_text_leaves_out_the_test_sentences():
  cfg = corpus.CorpusConfig(max_sentences=1)  # one sentence per line: each can be checked
  lines = corpus.lm_text(cfg, 3000)
  held_out = [corpus._held_out("sentence:" + line, cfg.test_sentence_fraction, cfg.seed) for line in lines]
  assert len(lines) == 3000 and not any(held_out)
  # The control: the same generator without the filter draws held-out sentences ~15% of the time.
  from w2v2_jax.demo import sentences

  rng = np.random.default_rng(0)
  drawn = [sentences.sentence(rng) for _ in range(3000)]
  rate = np.mean([corpus._held_out("sentence:" + s, cfg.test_sentence_fraction, cfg.seed) for s in drawn])
  assert 0.1 < rate < 0.2
  assert lines == corpus.lm_text(cfg, 3000)  # deterministic for the config
  test_texts = {spec.text for spec in corpus.plan(corpus.CorpusConfig())["test"]}
  assert not test_texts & set(corpus.lm_text(corpus.CorpusConfig(), 3000))
  assert len(set(itertools.islice(lines, 1000))) > 900  # a varied text, not a few lines repeated
