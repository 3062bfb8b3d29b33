"""The pre-training run, top to bottom: config check, mesh, data, state, step, loop.

Restarting the same command resumes from the latest complete checkpoint, with the data iterator
where it stopped, so an interrupted run ends bitwise equal to an uninterrupted one (same mesh).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from w2v2_jax import parallel, storage
from w2v2_jax.data import pipeline, records
from w2v2_jax.models import flops, kernels, objectives
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.init import init_params
from w2v2_jax.train import checkpointing, events, optim
from w2v2_jax.train import step as steps


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def objective_config(config) -> objectives.ObjectiveConfig:
  fields = objectives.ObjectiveConfig.__dataclass_fields__
  return objectives.ObjectiveConfig(**{k: v for k, v in config.objective.items() if k in fields})


def corpus_config(config):
  """The offline corpus that config.data.corpus_* describe."""
  from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

  return corpus.CorpusConfig(
    unlabeled_hours=config.data.corpus_hours,
    labeled_voices=config.data.corpus_labeled_voices,
    rooms=config.data.corpus_rooms,
  )


def data_dir(config) -> str:
  if config.data.source == "corpus":
    from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

    return corpus.ensure_corpus(corpus_config(config), log=logging.info)
  if config.data.source != "shards" or not config.data.data_dir:
    raise ValueError(
      "config.data.source must be 'corpus', or 'shards' with config.data.data_dir set "
      f"(got source={config.data.source!r}, data_dir={config.data.data_dir!r})"
    )
  return config.data.data_dir


def is_ctc(config) -> bool:
  return config.get("task", "pretrain") == "ctc"


def input_config(config, directory: str, split: str, train: bool) -> pipeline.InputConfig:
  d = config.data
  return pipeline.InputConfig(
    directory,
    split,
    config.batch_size,
    max_sample_size=d.max_sample_size,
    min_sample_size=d.min_sample_size,
    num_buckets=d.num_buckets,
    mode=d.mode,
    bucketing=d.get("bucketing", "geometric"),  # absent in older saved configs
    shuffle=train,
    seed=config.seed,
    num_epochs=None if train else 1,
    crop_long=not is_ctc(config),  # a transcript covers the whole utterance
    complete=not train and is_ctc(config),  # WER/CER on every utterance
    read_concurrency=d.get("read_concurrency", 64),
  )


def open_input(config, directory, split, train, rows, vocab=None) -> pipeline.AudioInput:
  """The input of one split; CTC batches also carry the transcripts' label ids."""
  cfg = input_config(config, directory, split, train)
  labels = None
  if vocab is not None:
    from w2v2_jax.train import finetune  # pylint: disable=import-outside-toplevel

    labels = finetune.label_arrays(records.load_split(directory, split).transcripts(), vocab)
  data = pipeline.AudioInput(cfg, rows=rows, labels=labels)
  if jax.process_index() == 0:
    logging.info("%s split: %s", split, data.batches.describe())
  return data


def ctc_vocabulary(config, directory, workdir):
  """The run's letter vocabulary: workdir/vocab.json if it exists (resume), else built from the train split."""
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel

  path = storage.join(workdir, "vocab.json")
  if storage.exists(path):
    vocab = ctc.Vocabulary.load(path)
  else:
    transcripts = records.load_split(directory, config.data.train_split).transcripts()
    if not any(transcripts):
      raise ValueError(
        f"config.data.train_split={config.data.train_split!r} in {directory} has no transcripts; "
        "CTC fine-tuning needs a labeled split"
      )
    vocab = ctc.Vocabulary.build(transcripts)
    if jax.process_index() == 0:
      vocab.save(path)
  config.model.vocab_size = len(vocab)
  return vocab


def beam_decoder(config, workdir, vocab):
  """The final evaluation's beam-search decoder (config.decode), or None; built before training so
  that a missing model or library fails at once, not after the last update."""
  from w2v2_jax.train import finetune  # pylint: disable=import-outside-toplevel

  if not finetune.beam_decoding(config):
    return None
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel

  decode = config.decode
  lm_path = decode.kenlm or None
  if lm_path == "corpus":
    if config.data.source != "corpus":
      raise ValueError(
        "config.decode.kenlm='corpus' estimates an n-gram from the offline corpus's LM text; "
        f"with config.data.source={config.data.source!r} give a KenLM file instead"
      )
    from w2v2_jax.decoding import ngram  # pylint: disable=import-outside-toplevel
    from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

    text = corpus.lm_text(corpus_config(config), decode.lm_lines)
    kept = storage.join(workdir, "lm.arpa")
    lm_path = ngram.build_arpa(map(ctc.normalize, text), storage.local_path(kept), decode.lm_order)
    if storage.is_url(kept) and jax.process_index() == 0:
      storage.upload(lm_path, kept, keep_local=True)  # KenLM reads the local copy; the workdir keeps one too
    logging.info("%d-gram LM from %d lines of the corpus's LM text -> %s", decode.lm_order, len(text), kept)
  elif lm_path and not storage.exists(lm_path):
    raise ValueError(f"config.decode.kenlm={lm_path!r}: no such file (a KenLM .arpa/.bin, or 'corpus')")
  elif lm_path:
    lm_path = storage.local_copy(lm_path)  # KenLM opens local files only
  return ctc.beam_search_decoder(
    vocab, kenlm_path=lm_path, alpha=decode.alpha, beta=decode.beta, beam_width=max(decode.beam, 1)
  )


def validate(config, mesh) -> None:
  """Checks that fail before compiling, each naming its key."""
  cfg, obj = model_config(config), objective_config(config)
  if config.get("task", "pretrain") not in ("pretrain", "ctc"):
    raise ValueError(f"config.task={config.task!r}: use 'pretrain' or 'ctc'")
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
      f"config.batch_size={config.batch_size} does not divide over the mesh's batch axes (data x fsdp = {batch_shards})"
    )
  if config.batch_size % (config.train.microbatches * batch_shards):
    raise ValueError(
      f"config.train.microbatches={config.train.microbatches}: each micro-batch of "
      f"{config.batch_size} // microbatches must divide over {batch_shards} batch shards"
    )
  bucketing = config.data.get("bucketing", "geometric")
  if bucketing not in pipeline.BUCKETINGS:
    raise ValueError(f"config.data.bucketing={bucketing!r}: use one of {pipeline.BUCKETINGS}")
  shortest = config.data.min_sample_size  # the least real audio of a row, in either mode
  if shortest < cfg.receptive_field:
    raise ValueError(
      f"config.data.min_sample_size={shortest}: the shortest utterance or crop is "
      f"shorter than the receptive field ({cfg.receptive_field} samples)"
    )
  frames = int(cfg.num_frames(shortest))
  if not is_ctc(config) and (frames < obj.mask_length + 1 or frames < obj.num_negatives // 4):
    raise ValueError(
      f"config.data.min_sample_size={config.data.min_sample_size}: {frames} frames in the "
      f"shortest bucket cannot hold mask spans of config.objective.mask_length="
      f"{obj.mask_length} and draw config.objective.num_negatives={obj.num_negatives}"
    )
  if config.data.mode not in ("crop", "pad"):
    raise ValueError(f"config.data.mode={config.data.mode!r}: use 'crop' or 'pad'")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where everything lives: the mesh, the optimiser, and the state's shapes and shardings."""

  mesh: jax.sharding.Mesh
  tx: Any
  abstract_state: Any  # steps.TrainState of ShapeDtypeStructs
  state_shardings: Any  # steps.TrainState of NamedShardings
  param_shardings: Any
  table: str  # the printable parameter sharding table


def plan_layout(config, devices=None) -> Layout:
  """Mesh from config.mesh (over `devices`, default all), FSDP/tensor shardings from the rules.

  Validates the config first, and refuses large parameters left replicated under FSDP.
  """
  cfg = model_config(config)
  mesh = parallel.make_mesh({a: config.mesh[a] for a in parallel.AXES}, devices)
  validate(config, mesh)
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
  tx = optim.optimizer(config.optim, config.num_train_steps)
  kind = "ctc" if is_ctc(config) else "pretraining"
  boxed = jax.eval_shape(lambda k: init_params(cfg, k, kind, boxed=True), jax.random.key(0))
  param_sh = parallel.param_shardings(boxed, mesh, rules)
  abstract_params = jax.tree.map(
    lambda x: x.value if hasattr(x, "value") else x, boxed, is_leaf=lambda x: hasattr(x, "value")
  )
  table, offenders = parallel.sharding_table(abstract_params, param_sh, mesh)
  if offenders:
    raise ValueError(f"config.mesh.rules leave large parameters replicated under FSDP: {offenders[:3]}")
  abstract_state = jax.eval_shape(lambda: steps.init_state(abstract_params_zeros(abstract_params), tx))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sh = jax.tree.map(lambda _: replicated, abstract_state)
  state_sh = dataclasses.replace(
    state_sh, params=param_sh, opt_state=_shard_like_params(abstract_state.opt_state, param_sh, replicated)
  )
  abstract_state = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_state, state_sh
  )
  return Layout(mesh, tx, abstract_state, state_sh, param_sh, table)


def jit_steps(config, layout: Layout):
  """w2v2-train's jitted train step (donated state) and eval step for a layout; w2v2-aot and
  w2v2-bench compile these same two."""
  cfg, obj = model_config(config), objective_config(config)
  cfg = kernels.resolved(cfg, parallel.mesh_platform(layout.mesh))  # the compile target's, not the host's
  batch_sh = parallel.batch_sharding(layout.mesh)
  train_step = jax.jit(
    steps.make_train_step(cfg, obj, layout.tx, config),
    donate_argnums=(0,),
    in_shardings=(layout.state_shardings, batch_sh, None),
    out_shardings=(layout.state_shardings, None),
  )
  eval_step = jax.jit(
    steps.make_eval_step(cfg, obj, config), in_shardings=(layout.param_shardings, batch_sh, None, None)
  )
  return train_step, eval_step


class Preemption:
  """One process: SIGTERM sets a flag; the loop saves and exits at the next step boundary.

  Several processes: nothing here. JAX's preemption notifier owns SIGTERM (a handler installed here
  would replace it) and its sync point, reached by every process at the same step, stops the loop.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config, workdir: str, on_log=None) -> dict:
  """Runs (or resumes) pre-training or CTC fine-tuning (config.task); returns the last logged metrics.

  `on_log(step, metrics)`, if given, is called on process 0 at every log and eval step (e.g. a
  notebook's live plot); metrics are the console's figures as floats.
  """
  storage.makedirs(workdir)
  storage.check_writable(workdir)  # a missing bucket or no access: one line now, not after compiling
  pipeline.import_tensorflow_in_background()  # tf.data is first needed at the first batch
  is_main = jax.process_index() == 0
  directory = data_dir(config)
  vocab = ctc_vocabulary(config, directory, workdir) if is_ctc(config) else None
  decoder = beam_decoder(config, workdir, vocab) if vocab is not None else None
  kind = "ctc" if vocab is not None else "pretraining"
  cfg = model_config(config)

  # -- mesh and state layout ------------------------------------------------------------------
  layout = plan_layout(config)
  mesh, tx, state_sh = layout.mesh, layout.tx, layout.state_shardings
  if is_main:
    logging.info("mesh %s; parameter shardings:\n%s", dict(mesh.shape), layout.table)

  # -- data -------------------------------------------------------------------------------------
  batch_sharding = parallel.batch_sharding(mesh)
  rows = pipeline.local_rows(batch_sharding, config.batch_size)
  train_data = open_input(config, directory, config.data.train_split, True, rows, vocab)
  valid_data = open_valid(config, directory, rows, vocab)

  peak, peak_source = flops.peak_flops(jax.local_devices()[0], cfg.dtype)  # before the mesh context
  peak *= jax.device_count()
  if is_main:
    logging.info("MFU is against %.3g FLOP/s for %d devices (%s)", peak, jax.device_count(), peak_source)

  # -- state ------------------------------------------------------------------------------------
  abstract_state = layout.abstract_state
  with jax.set_mesh(mesh):
    if vocab is not None:
      from w2v2_jax.train import finetune  # pylint: disable=import-outside-toplevel

      init = lambda k: jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)(  # noqa: E731
        finetune.initial_params(cfg, config, k, layout.param_shardings)
      )
    else:
      init = jax.jit(lambda k: steps.init_state(init_params(cfg, k), tx), out_shardings=state_sh)
    mgr = checkpointing.manager(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    restored = checkpointing.restore_run(mgr, abstract_state)
    if restored is None:
      state = init(jax.random.key(config.seed))
      start = 0
    else:
      start, state, data_state = restored
      train_data.restore(data_state)
      logging.info("resumed from step %d (data position %d)", start, train_data.position)

    # -- step -----------------------------------------------------------------------------------
    train_step, eval_step = jit_steps(config, layout)

    # -- loop -----------------------------------------------------------------------------------
    writer = events.EventWriter(storage.join(workdir, "tensorboard")) if is_main else None
    experiment = json.loads(config.to_json())
    preemption = Preemption()
    key = jax.random.key(config.seed + 1, impl=config.rng_impl)
    last, t_log, audio_s, steps_since, step_flops, input_s = {}, time.time(), 0.0, 0, 0.0, 0.0
    for step in range(start, config.num_train_steps):
      waited = time.perf_counter()
      batch = pipeline.to_global(next(train_data), batch_sharding, config.batch_size)
      input_s += time.perf_counter() - waited  # the host blocked on input: near 1 of the time, a starved step
      state, metrics = train_step(state, batch, key)
      audio_s += metrics["audio_samples"]  # device scalar; summed without a host sync
      step_flops += flops.train_flops(
        cfg, batch["audio"].shape[1], config.batch_size, "ctc" if vocab is not None else "pretraining"
      )
      steps_since += 1
      done = step + 1
      if done % config.log_every_steps == 0 or done == config.num_train_steps:
        metrics = jax.device_get(metrics)
        if int(metrics["skipped_in_a_row"]) >= config.train.max_consecutive_skips:
          raise FloatingPointError(
            f"{int(metrics['skipped_in_a_row'])} non-finite steps in a row at step {done}: lower "
            "config.optim.lr, set config.optim.clip_norm, or raise config.train.max_consecutive_skips"
          )
        elapsed = time.time() - t_log
        last = {k: float(v) for k, v in metrics.items() if k != "audio_samples"}
        last.update(
          audio_seconds_per_second=float(audio_s) / 16000 / elapsed,
          step_time=elapsed / steps_since,
          mfu=step_flops / elapsed / peak,
          input_wait=input_s / elapsed,
        )
        eta = (config.num_train_steps - done) * last["step_time"]
        if vocab is None:
          health = "acc %.3f ppl %.1f/%.1f temp %.3f" % (
            last["accuracy"],
            last["prob_perplexity"],
            last["code_perplexity"],
            last["temperature"],
          )
        else:
          health = "ctc %.3f" % last["ctc_loss"]
        logging.info(
          "step %d/%d loss %.3f %s lr %.2e gnorm %.2f skipped %d | %.1f audio-s/s %.2f s/step MFU %.1f%% "
          "input wait %.0f%% ETA %s",
          done,
          config.num_train_steps,
          last["loss"],
          health,
          last["lr"],
          last["grad_norm"],
          int(last["skipped_total"]),
          last["audio_seconds_per_second"],
          last["step_time"],
          100 * last["mfu"],
          100 * last["input_wait"],
          time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        if writer:
          for k, v in last.items():
            writer.scalar(f"train/{k}", v, done)
          writer.flush()
        if on_log is not None and is_main:
          on_log(done, dict(last))
        t_log, audio_s, steps_since, step_flops, input_s = time.time(), 0.0, 0, 0.0, 0.0
      if done % config.eval_every_steps == 0 or done == config.num_train_steps:
        ev = evaluate(
          config,
          valid_data,
          eval_step,
          state.params,
          batch_sharding,
          done,
          vocab,
          decoder if done == config.num_train_steps else None,
        )
        if ev and vocab is not None:
          logging.info(
            "step %d valid loss %.3f WER %.3f CER %.3f%s",
            done,
            ev["loss"],
            ev["wer"],
            ev["cer"],
            " (beam search: WER %.3f CER %.3f)" % (ev["beam_wer"], ev["beam_cer"]) if "beam_wer" in ev else "",
          )
          if is_main:
            record_eval(workdir, {"step": done, "split": config.data.valid_split, **ev})
        elif ev:
          logging.info("step %d valid loss %.3f acc %.3f", done, ev["loss"], ev["accuracy"])
        if ev:
          last.update({f"valid_{k}": v for k, v in ev.items()})
          if writer:
            for k, v in ev.items():
              writer.scalar(f"valid/{k}", v, done)
            writer.flush()
          if on_log is not None and is_main:
            on_log(done, {f"valid_{k}": v for k, v in ev.items()})
      # One process: our SIGTERM flag. Several: only Orbax's preemption sync point, which every
      # process reaches at the same step (a flag seen by some processes would deadlock the save).
      preempted = mgr.reached_preemption(done) or (preemption.requested and jax.process_count() == 1)
      checkpointing.save(
        mgr,
        done,
        state,
        cfg,
        kind,
        experiment,
        train_data.state(),
        {"step": done, "time": time.time()},
        vocab=vocab.tokens if vocab is not None else None,
        force=preempted or done == config.num_train_steps,
      )
      if preempted:
        logging.warning("preempted: saved step %d; re-run the same command to resume", done)
        break
    mgr.wait_until_finished()
    mgr.close()
  if writer:
    writer.close()  # a bucket: the last events' upload
  for data in (train_data, valid_data):
    if data is not None:
      data.close()  # its reading threads, before the caller moves on (or exits)
  last["step"] = int(jax.device_get(state.step))
  last["params"] = state.params
  return last


def open_valid(config, directory, rows, vocab=None):
  """The validation input (one pass per evaluation), or None with a warning if the split is unusable."""
  try:
    return open_input(config, directory, config.data.valid_split, False, rows, vocab)
  except ValueError as e:
    logging.warning("no validation: %s", e)
    return None


def evaluate(config, data, eval_step, params, batch_sharding, step, vocab=None, decoder=None) -> dict:
  """Mean metrics over config.eval_batches batches of the valid split (if present); CTC adds the
  corpus-level WER and CER of greedy decoding (config.eval_batches <= 0: the whole split), and with
  a beam-search `decoder` its beam_wer and beam_cer."""
  if data is None:
    return {}
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  data.seek(0)
  sums, n, refs, hyps, beam_hyps = {}, 0, [], [], []
  for batch in data:
    global_batch = pipeline.to_global(batch, batch_sharding, config.batch_size)
    m = eval_step(params, global_batch, jax.random.key(n), step)
    log_probs = m.pop("log_probs", None)
    if vocab is not None:
      from w2v2_jax.train import finetune  # pylint: disable=import-outside-toplevel

      argmax, frames, labels, label_lengths = multihost_utils.process_allgather(
        (m.pop("logits_argmax"), m.pop("frame_lengths"), global_batch["labels"], global_batch["label_lengths"]),
        tiled=True,
      )
      r, h = finetune.error_rates(vocab, argmax, frames, labels, label_lengths)
      keep = [i for i, ref in enumerate(r) if ref]  # rows without a transcript (padding) are not scored
      refs += [r[i] for i in keep]
      hyps += [h[i] for i in keep]
      if decoder is not None:
        log_probs = multihost_utils.process_allgather(log_probs, tiled=True)
        beam_hyps += [decoder.decode(log_probs[i, : int(frames[i])]) for i in keep]
    for k, v in jax.device_get(m).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
    if n == config.eval_batches:
      break
  out = {k: v / n for k, v in sums.items()} if n else {}
  if refs:
    from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel

    out.update(wer=ctc.word_error_rate(refs, hyps), cer=ctc.char_error_rate(refs, hyps), utterances=len(refs))
    if beam_hyps:
      out.update(beam_wer=ctc.word_error_rate(refs, beam_hyps), beam_cer=ctc.char_error_rate(refs, beam_hyps))
    logging.info("e.g. REF: %s | HYP: %s", refs[0], hyps[0])
  return out


def abstract_params_zeros(abstract):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def _shard_like_params(opt_state, param_sh, replicated):
  """Walk the optax state: any subtree shaped like the params tree takes the params' shardings."""
  params_struct = jax.tree.structure(param_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))

  def visit(node):
    try:
      if jax.tree.structure(node) == params_struct:
        return param_sh
    except Exception:  # noqa: BLE001
      pass
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(c) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(c) for c in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return jax.tree.map(lambda _: replicated, node)

  return visit(opt_state)


def record_eval(workdir: str, entry: dict) -> None:
  """Adds one evaluation's line to WORKDIR/eval_results.json (JSON lines). The file is rewritten whole,
  never appended to: an object in a bucket cannot be, and a reader sees the old file or the new one."""
  path = storage.join(workdir, "eval_results.json")
  before = storage.read_text(path) if storage.exists(path) else ""
  storage.write_text(path, before + json.dumps(entry) + "\n")
