"""Mixtures of prepared data dirs (data.sources): XLS-R's shares, uniform draws within a source, the
config's errors, and two "languages" of the offline corpus through w2v2-train."""

import os
import subprocess
import sys

import numpy as np
import pytest
import train_config
from scipy import stats

from w2v2_jax.data import mixture, records
from w2v2_jax.data.pipeline import Batches, InputConfig
from w2v2_jax.train import events, inputs, loop

HERE = os.path.dirname(os.path.abspath(__file__))
MIN, MAX = 16_000, 160_000


def _three_sources():
  """Lengths and sources of 3 sources of unequal size whose utterances differ in mean length too (3 s,
  8 s, 5 s), so that shares of hours and of utterances differ."""
  rng = np.random.default_rng(7)
  sizes, means = (3000, 600, 150), (3.0, 8.0, 5.0)
  lengths = np.concatenate([(rng.gamma(4.0, m / 4.0, n) * 16000).astype(np.int64) for n, m in zip(sizes, means)])
  source = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(sizes)])
  return lengths, source


def _batches(lengths, source, alpha, **kw):
  names = tuple(f"s{k}" for k in range(source.max() + 1))
  cfg = InputConfig(
    "",
    "train",
    global_batch=16,
    max_sample_size=MAX,
    min_sample_size=MIN,
    num_buckets=3,
    sources=tuple((n, f"/unused/{n}") for n in names),
    sampling_alpha=alpha,
    **{"seed": 3, **kw},
  )
  return Batches(cfg, lengths, source)


def _drawn(batches, epochs):
  """Every planned row's record over `epochs` epochs."""
  plans = [batches.epoch(e).records for e in range(epochs)]
  recs = np.concatenate([p.ravel() for p in plans])
  return recs[recs >= 0]


def test_sampled_shares_follow_xlsr_alpha_on_hours():
  """Chi-square goodness of fit of the rows drawn per source over 30 epochs against
  p_l = q_l^0.5 / sum q_k^0.5, q_l the source's share of the usable hours. Each epoch draws fixed
  counts per source (as fairseq's ResamplingDataset), so the fit is as close as whole rows allow; the
  controls (the same rule on utterance counts, and alpha = 1) must fail the same test."""
  lengths, source = _three_sources()
  drawn = _drawn(_batches(lengths, source, 0.5), 30)
  counts = np.bincount(source[drawn], minlength=3)
  usable = lengths >= MIN
  hours = np.bincount(source[usable], weights=lengths[usable], minlength=3) / 16000 / 3600
  utterances = np.bincount(source[usable], minlength=3)

  def expected(size, alpha):
    p = (size / size.sum()) ** alpha
    return counts.sum() * p / p.sum()

  fit = stats.chisquare(counts, expected(hours, 0.5))
  on_utterances = stats.chisquare(counts, expected(utterances, 0.5))
  natural = stats.chisquare(counts, expected(hours, 1.0))
  print(
    f"\nrows per source {counts.tolist()} of {counts.sum()}; chi-square p: alpha 0.5 on hours {fit.pvalue:.4g}, "
    f"on utterances {on_utterances.pvalue:.3g}, alpha 1 {natural.pvalue:.3g}"
  )
  assert fit.pvalue > 0.01
  assert on_utterances.pvalue < 1e-3 and natural.pvalue < 1e-3
  # explicit weights: shares proportional to them, whatever the hours
  weighted = _batches(lengths, source, 0.5, source_weights=(1.0, 1.0, 2.0))
  counts = np.bincount(source[_drawn(weighted, 10)], minlength=3)
  assert stats.chisquare(counts, counts.sum() * np.array([0.25, 0.25, 0.5])).pvalue > 0.01
  assert stats.chisquare(counts, counts.sum() * np.array([1 / 3, 1 / 3, 1 / 3])).pvalue < 1e-3


def test_each_source_draws_its_utterances_uniformly_and_fills_whole_batches():
  """In a (source, bucket) cell of u utterances and d draws, each utterance is drawn d // u times per
  epoch, and a random d % u of them once more: per utterance, the extra draws over E epochs have mean
  E f and variance E f (1 - f) (f = (d % u) / u), covariance -E f (1 - f) / (u - 1) between two, so
  sum (O - E f)^2 / (E f (1 - f)) * (u - 1) / u is chi-square with u - 1 degrees of freedom. Summed
  over cells, it must not reject uniform draws (p > 0.01) and must reject draws in proportion to
  length (p < 0.001). Every bucket holds whole batches: nothing drawn is left out."""
  lengths, source = _three_sources()
  b = _batches(lengths, source, 0.3)
  assert b.mix.per_cell.sum() == 16 * b.per_epoch == 16 * (int((lengths >= MIN).sum()) // 16)
  assert not (b.mix.per_cell.sum(0) % 16).any()
  epochs = 40
  per_epoch = [np.bincount(b.epoch(e).records.ravel(), minlength=len(lengths)) for e in range(epochs)]
  base, extra = b.mix.repeats
  cell = b.mix.cell
  for once in per_epoch[:3]:
    assert ((once[cell >= 0] - base[cell[cell >= 0]]) <= 1).all() and (once[cell >= 0] >= base[cell[cell >= 0]]).all()
    assert not once[cell < 0].any()
  counts = np.sum(per_epoch, axis=0)
  stat = biased = dof = 0.0
  for c in np.flatnonzero(extra):
    members = np.flatnonzero(cell == c)
    u, f = len(members), extra[c] / len(members)
    if u < 2:
      continue
    picks = counts[members] - epochs * base[c]
    scale = (u - 1) / u / (epochs * f * (1 - f))
    stat += scale * ((picks - epochs * f) ** 2).sum()
    weighted = epochs * extra[c] * lengths[members] / lengths[members].sum()
    biased += scale * ((picks - weighted) ** 2).sum()
    dof += u - 1
  p, p_biased = stats.chi2.sf(stat, dof), stats.chi2.sf(biased, dof)
  print(f"\nper-utterance draws, {dof:.0f} dof: chi-square p {p:.4g}; length-weighted control {p_biased:.3g}")
  assert p > 0.01 and p_biased < 1e-3
  rate = b.mix.per_cell.sum(1) / b.mix.utterances
  assert rate[0] < 1 < rate[2]  # one source down-, one upsampled
  assert (counts[cell >= 0] > 0).all()


def test_sources_parse_and_bad_mixtures_are_one_line_naming_the_key(speech_like_shards):
  assert mixture.parse_sources("en=gs://b/lang=en, fr=/data/fr") == (("en", "gs://b/lang=en"), ("fr", "/data/fr"))
  assert mixture.parse_weights("fr=1,en=3", ("en", "fr")) == (3.0, 1.0)
  c = train_config.get_config(",1")
  c.data.sources = f"a={speech_like_shards},b={speech_like_shards}"
  assert inputs.sources(c) == (("a", speech_like_shards), ("b", speech_like_shards))
  assert inputs.data_dir(c) == speech_like_shards  # the first source: what one-split tools read
  bad = {
    "data_dir": ("and config.data.data_dir=", {"data_dir": speech_like_shards}),
    "entry": ("is not NAME=DATA_DIR", {"sources": f"a={speech_like_shards},{speech_like_shards}"}),
    "twice": ("appears twice", {"sources": f"a={speech_like_shards},a={speech_like_shards}"}),
    "weights": ("give every source", {"source_weights": "a=1"}),
    "negative": ("exactly one weight >= 0", {"source_weights": "a=1,b=-1"}),
    "number": ("is not NAME=NUMBER", {"source_weights": "a=1,b=x"}),
    "alpha": ("config.data.sampling_alpha=-0.5", {"sampling_alpha": -0.5}),
    "corpus": ("config.data.source='corpus'", {"source": "corpus"}),
  }
  from w2v2_jax import parallel

  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  for name, (message, keys) in bad.items():
    wrong = train_config.get_config(",1")
    wrong.data.sources = c.data.sources
    wrong.data.update(keys)
    with pytest.raises(ValueError, match=message) as e:
      loop.validate(wrong, mesh)
    assert "\n" not in str(e.value), name
  ctc = train_config.get_config(",1")
  ctc.data.sources, ctc.task = c.data.sources, "ctc"
  with pytest.raises(ValueError, match="mixtures are for pre-training"):
    inputs.sources(ctc)
  for keys in ({"source_weights": "a=1,b=2"}, {"sampling_alpha": 0.5}):  # a mixture's weights, no mixture
    alone = train_config.get_config(f"{speech_like_shards},1")
    alone.data.update(keys)
    with pytest.raises(ValueError, match="config.data.sources is empty"):
      loop.validate(alone, mesh)
  lengths, source = _three_sources()
  with pytest.raises(ValueError, match="s1 has no utterance"):
    _batches(np.where(source == 1, MIN - 1, lengths), source, 0.5)


def _corpus_languages(tmp_path, sizes=(28, 4), valid=8) -> dict:
  """The offline corpus's utterances as two "languages": `big` takes the first sizes[0], `small` the next
  sizes[1], each with `valid` test utterances as its valid split. Returns {name: data dir}."""
  from w2v2_jax.demo import corpus

  cfg = corpus.CorpusConfig(unlabeled_hours=0.05, labeled_minutes=0.2, test_minutes=1.0, shard_size=64)
  local = corpus.ensure_corpus(cfg, cache_dir=str(tmp_path / "cache"), workers=1, log=lambda _: None)

  def read(split):
    return [records.decode(r) for shard in records.shard_paths(local, split) for r in records._records(shard)]  # pylint: disable=protected-access

  train, test = read("unlabeled"), read("test")
  assert len(train) >= sum(sizes) and len(test) >= 2 * valid, (len(train), len(test))
  dirs, first = {}, 0
  for k, (name, n) in enumerate(zip(("big", "small"), sizes)):
    dirs[name] = str(tmp_path / name)
    records.write_split(dirs[name], "train", train[first : first + n], shard_size=32)
    records.write_split(dirs[name], "valid", test[k * valid : (k + 1) * valid], shard_size=32)
    first += n
  return dirs


@pytest.mark.slow
def test_two_corpus_languages_train_at_the_shares_alpha_predicts(tmp_path):
  """w2v2-train on the corpus split into two languages of unequal size (28 and 4 utterances): one epoch
  of 4 batches of 8 is logged as one interval, and its shares are alpha's (to one row in 32) for
  alpha 0.5 and for alpha 1, which differ by more. Each source's valid split is evaluated, and the
  overall valid loss is their mean."""
  dirs = _corpus_languages(tmp_path)
  hours = np.array([records.load_split(dirs[n], "train").num_samples.sum() / 16000 / 3600 for n in ("big", "small")])
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",  # XLA_FLAGS as in this process: 8 CPU devices
    "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
  }
  logged = {}
  for alpha in (0.5, 1.0):
    workdir = str(tmp_path / f"alpha{alpha}")
    cmd = [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      f"--config={HERE}/train_config.py:,4",  # tiny model, batch 8, one bucket of 1 s crops
      f"--workdir={workdir}",
      f"--config.data.sources=big={dirs['big']},small={dirs['small']}",
      f"--config.data.sampling_alpha={alpha}",
      "--config.log_every_steps=4",
      "--config.eval_every_steps=4",
      "--plots=false",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(l for l in run.stderr.splitlines() if "step 4/4 loss" in l)
    assert "| share big " in line, line
    scalars = events.read_scalars(workdir)
    logged[alpha] = scalars["data/share/big"][-1][1], scalars["data/share/small"][-1][1]
    q = hours / hours.sum()
    predicted = q**alpha / (q**alpha).sum()
    print(f"\nalpha {alpha}: hours {hours.round(4).tolist()}, predicted {predicted.round(4).tolist()}")
    print(f"logged {logged[alpha]}")
    print(next(l for l in run.stderr.splitlines() if "mixture (" in l))
    print(line[line.index("| share") :])
    np.testing.assert_allclose(logged[alpha], predicted, atol=1 / 32 + 1e-6)
    valid = {k: scalars[f"valid/{k}"][-1][1] for k in ("loss", "big/loss", "small/loss")}
    np.testing.assert_allclose(valid["loss"], (valid["big/loss"] + valid["small/loss"]) / 2, rtol=1e-5)
  assert logged[0.5][1] - logged[1.0][1] > 3 / 32  # alpha 0.5 upsamples the small language
