"""The experiment loop: resume, train, evaluate, log, checkpoint.

Read `train` top to bottom; `dlfx.experiment.build` makes every piece it uses from the config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections

from dlfx import config as config_lib
from dlfx import checkpoint, data, feed, log, optim, parallel, plot, preflight, remote, runs, steps, stopping, tasks
from dlfx import train_metrics as train_metrics_lib
from dlfx.checkpoint import BestCheckpoint, Checkpointer
from dlfx.errors import ConfigError, WorkdirError, one_line
from dlfx.experiment import build, evaluate, init_from_pretrained
from dlfx.restore import checkpoint_dir, evaluate_workdir, restore_run  # noqa: F401  (re-exported)
from dlfx.preemption import Preemption
from dlfx.workdir import DATA_FILE, WorkdirLock, read_status, write_json, write_status  # noqa: F401


def train(config: ml_collections.ConfigDict, workdir: str, force: bool = False,
          preemption: Preemption | None = None) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming from its newest valid checkpoint); return a summary. `preemption`:
    one the caller installed earlier (the command line, from its first moment), else one from here on."""
    start_time = time.time()
    # SIGTERM from here on: the run saves what is new and exits 0
    with contextlib.nullcontext(preemption) if preemption is not None else Preemption() as preemption:
        with remote.mirrored(workdir, writer=jax.process_index() == 0) as (local, pushed):  # gs://: a local mirror
            return _train(config, local, force, preemption, start_time, pushed) | {"workdir": workdir}


def _train(config, workdir, force, preemption, start_time, before_save=lambda: None) -> dict[str, Any]:
    """See `train`: set up the workdir, run the loop, record the outcome."""
    config_lib.check_workdir(config, workdir, force)
    preflight.check_training_devices(config)
    exp = build(config)  # fails on bad input before anything is written
    is_main = jax.process_index() == 0
    ckpt_dir = checkpoint_dir(config, workdir)
    checkpoint.check_owner(ckpt_dir, config, workdir, force)  # never train on (or delete) another run's state
    if config.train.checkpoint_dir or "://" in ckpt_dir:  # a local workdir/checkpoints is checked with the workdir
        checkpoint.check_writable(ckpt_dir)

    # --- Workdir: lock it, restore the newest valid checkpoint, record the config ---------------
    created = not os.path.exists(workdir)
    lock = WorkdirLock(workdir)
    train_iter = None
    try:
        os.makedirs(workdir, exist_ok=True)
        if is_main:
            lock.acquire()
        train_iter = feed.device_prefetcher(exp, exp.train_iterator(),
                                            feed.call_sizes(exp, config.train.steps_per_call))
        if jax.process_count() == 1:  # SIGTERM also reaches a loop waiting on a stalled reader
            train_iter.interrupted = lambda: preemption.requested
        checkpointer = Checkpointer(ckpt_dir, keep=config.train.keep)
        restored = checkpointer.restore_latest(exp.abstract_state, train_iter)
        if restored is not None and not force:  # the data set it was trained on
            stopping.on_process_zero(lambda: data.check_unchanged(workdir, exp.dataset))
        if restored is None:  # a fresh run (from pretrained weights, if asked): the one live state
            state = exp.init()
            restored_or_fresh = (init_from_pretrained(exp, state) if config.init_from.path else state), None
        else:
            restored_or_fresh = restored
        done = (restored is not None and restored[1] == exp.total_steps
                and runs.is_finished(workdir, exp.total_steps))
        timing = runs.timing(workdir) if restored is not None and restored[1] == exp.total_steps else {}
        if is_main and not done:
            config_lib.write_workdir(config, workdir)  # with imports.json: where its import paths were found
            checkpoint.claim(ckpt_dir, config, workdir)
            write_json(os.path.join(workdir, DATA_FILE), data.describe(exp.dataset))  # model and vocabulary
            write_status(workdir, "running", strict=True, pid=os.getpid(), total_steps=exp.total_steps)
    except BaseException as e:  # Ctrl-C included: a failed start leaves no half-made workdir and no lock
        if train_iter is not None:
            train_iter.release()
        lock.release()
        if created and is_main:
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"cannot use workdir {workdir}: {e.strerror or e}") from None
        raise
    if done:  # rerunning a finished run changes nothing
        train_iter.release()
        checkpointer.close()
        lock.release()
        return runs.finished_summary(exp, workdir, restored[0])
    try:
        best = BestCheckpoint(ckpt_dir, config.train.keep_best,  # the best eval's state, beside the newest
                              tasks.best_mode(config.train.keep_best, exp.task, config.train.best_mode)) \
            if config.train.keep_best else None
        summary = _loop(exp, config, workdir, checkpointer, train_iter, restored_or_fresh, start_time, preemption,
                        best, before_save)
        plotted = True
        if is_main and summary["status"] == "finished":  # plots before the status: a kill here redoes them
            plotted = plot.write_run_plots(workdir, exp.model, summary["state"], exp.dataset, exp.task)
    except BaseException as e:
        if is_main:
            write_status(workdir, "failed", error=one_line(e), total_steps=exp.total_steps,
                         wall_time=time.time() - start_time)
        raise
    finally:
        lock.release()
    if is_main:
        write_status(workdir, summary["status"], step=summary["step"], total_steps=exp.total_steps,
                     **({"wall_time": summary["wall_time"], "steps_per_sec": summary["steps_per_sec"]} | timing),
                     **({} if plotted else {"plots": "failed"}))  # a rerun makes them
    return summary


def _loop(exp, config, workdir, checkpointer, train_iter, start, start_time, preemption,
          best=None, before_save=lambda: None) -> dict[str, Any]:
    """Train from `start` = (state, restored step or None for a fresh state) to the last step; see `train`."""
    is_main, multi = jax.process_index() == 0, jax.process_count() > 1
    state, restored_step = start
    step = int(jax.device_get(state.step))
    if is_main:
        log.truncate_metrics(workdir, step)
    logger = log.RunLogger(workdir, exp.total_steps, step, enabled=is_main)
    if restored_step is not None:
        logger.message(f"resumed from step {step} in {remote.shown(workdir)}")
    elif config.init_from.path:
        logger.message(f"initialized from {config.init_from.path} ({config.init_from.format})")
    if config.optimizer.freeze:
        trainable, frozen = optim.count_frozen(exp.abstract_state.params, config.optimizer.freeze)
        logger.message(f"parameters: {trainable:,} trainable, {frozen:,} frozen")

    # --- Compiled steps (a small in-memory train split lives on the devices: batches are row indices) ----
    tables = data.resident.place(exp.dataset.train, exp.mesh) if exp.resident else None
    train_step, eval_step = exp.train_step(tables=tables), exp.eval_step()
    multi_step = exp.train_step(config.train.steps_per_call, tables) if config.train.steps_per_call > 1 else None
    call_sizes = feed.call_sizes(exp, config.train.steps_per_call) or (lambda position: 1)
    tuner = feed.CallTuner(exp) if feed.can_tune(exp) else None  # steps_per_call=0 on an accelerator
    per_call = max(config.train.steps_per_call, 1)
    groups = steps.param_groups(exp.abstract_state.params)

    # --- Loop -------------------------------------------------------------------------------
    def on_read(at: int, metrics: dict) -> None:
        logger.write(at, "train", metrics)
        logger.advance(at)

    window = train_metrics_lib.Window(exp.metric_names, config, groups, step, on_read)
    dispatch = parallel.DispatchLimit()  # bounded run-ahead: unbounded, XLA:CPU collectives could deadlock
    eval_metrics: dict[str, float] = {}
    status = "finished"
    cadence = checkpoint.SaveCadence(config.train.checkpoint_min_interval_s)
    first_step_s: float | None = None  # time to first step, from process start (compilation included)
    failing: BaseException | None = None
    try:
        if restored_step is not None:
            stopping.replay_unwritten(checkpointer, logger, workdir, step)
        if preemption.requested:  # SIGTERM during start-up: no step run, nothing new to save
            status = "preempted"
        while status == "finished" and step < exp.total_steps:
            count = call_sizes(step)  # steps in this call (the prefetcher stacked that many batches)
            try:
                batch = next(train_iter)
            except (data.WorkerLost, data.Interrupted) as e:  # keep the steps since the last save (one process)
                stopping.keep_before_stopping(checkpointer, window, logger, step, state, train_iter, before_save)
                if isinstance(e, data.WorkerLost):
                    logger.message(f"newest checkpoint: step {max(checkpointer.steps(), default=0)}")
                    raise
                status = "preempted"  # SIGTERM while a stalled reader held the next batch back
                break
            state, metrics = (multi_step if count > 1 else train_step)(state, batch)
            step += count
            if first_step_s is None:  # one host sync, on the first step only
                jax.block_until_ready(metrics)
                first_step_s = time.time() - log.process_start_time()
                logger.message(f"first step done {first_step_s:.1f} s after process start")
            window.add(metrics)
            dispatch.add(metrics)
            if tuner is not None and (chosen := tuner.observe(metrics)) is not None:
                logger.message(f"train.steps_per_call=auto: {chosen} (one step per call took "
                               f"{1e3 * tuner.step_seconds:.2f} ms)")
                tuner, per_call = None, chosen
                if chosen > 1:  # from the next call on; the batches read ahead are read again, stacked
                    multi_step = exp.train_step(chosen, tables)
                    call_sizes = feed.call_sizes(exp, chosen)
                    train_iter.regroup(call_sizes)
            window.read_deferred()  # the next call is queued: the device never waits on logging
            preempted = preemption.requested or (multi and checkpointer.reached_preemption(step))
            due = train_metrics_lib.due(step, exp.total_steps, config.train, preempted)
            # a run file that could not be written stops the run at the next log point, its window read now (so
            # the rerun's windows are an uninterrupted run's); with several processes, at the next point where
            # they all read it (only process 0 writes the run files)
            if not multi and logger.failure is not None and due.log and not due.read:
                due = train_metrics_lib.due(step, exp.total_steps, config.train, True)
            if due.log:
                window.close(step, read_now=due.read)
            if due.eval:
                eval_metrics = evaluate(exp, state, eval_step)
                logger.write(step, "eval", eval_metrics)
                if best:
                    best.offer(step, state, eval_metrics)
            scheduled = due.save and cadence.allows()  # asked on every process alike (a collective when several)
            if preempted or scheduled:
                logger.flush()
            if due.read and (stopping.process_zero_failed(logger) if multi else logger.failure is not None):
                # a run file could not be written (a full disk): keep this step and its records, then stop
                stopping.save_before_failing(checkpointer, step, state, train_iter, logger.unwritten)
                raise logger.failure or WorkdirError(f"stopped at step {step}: process 0 could not write the run "
                                                     "files (its error says why)")
            if preempted or scheduled:
                before_save()  # a remote workdir gets the logs up to this checkpoint first
                checkpointer.save(step, state, train_iter)
                cadence.saved()
            if preempted:
                status = "preempted"
                break

        # --- Final checkpoint and eval (a rerun after a kill here does only what is missing) ----
        if status == "finished":
            if step not in checkpointer.steps():
                before_save()
                checkpointer.save(step, state, train_iter)  # first: the newest state is safe before the eval
            logged = runs.logged_final_eval(workdir, step, is_main, config.train.keep_best)
            if preemption.requested:  # the eval is left for the rerun
                status = "preempted"
            elif logged is not None:
                eval_metrics = logged
            else:
                eval_metrics = evaluate(exp, state, eval_step)
                logger.write(step, "eval", eval_metrics)
            if best and status == "finished":  # also after a kill between the eval's log line and this save
                best.offer(step, state, eval_metrics)
        if logger.failure is not None:  # the final eval's record: a rerun evaluates again
            raise logger.failure
        saved = status != "preempted" or step in checkpointer.steps()
    except BaseException as e:
        failing = e
        raise
    finally:
        train_iter.release()
        stopping.close_writers(checkpointer, best, logger, failing=failing, workdir=workdir)
    if status == "preempted" and is_main:
        what = f"saved step {step} to {checkpointer.directory}" if saved else f"at step {step}, nothing new to save"
        print(f"dlfx: preempted: {what}; rerun the same command to resume", file=sys.stderr)
    end_time = time.time()
    return {"status": status, "step": step, "total_steps": exp.total_steps, "train": window.latest,
            "eval": eval_metrics, "wall_time": end_time - start_time, "steps_per_sec": window.steady_rate(),
            "workdir": workdir, "mode": exp.mode, "devices": exp.mesh.devices.size, "state": state,
            "step_traces": train_step.traces[0] + (multi_step.traces[0] if multi_step else 0),
            "time_to_first_step": first_step_s, "process_index": jax.process_index(), "steps_per_call": per_call}
