"""MB2PO end to end: AWAC pre-training, dynamics fit, conservative model-based fine-tuning.

Run from the repo root: ``python -m examples.mb2po.mb2po`` (quick preset, a few minutes on 2 CPU
cores, on a dataset generated locally with ``collect_behaviour_dataset``), or e.g.
``python -m examples.mb2po.mb2po task=hopper dataset=medium preset=paper data.source=d4rl
data.path=/data/hopper_medium-v2.hdf5``. See ``config.yaml``.

1. load (D4RL HDF5 / Minari) or generate the offline dataset (cached in ``output_dir/dataset``);
2. AWAC pre-training on the dataset (MB2PO Alg. 1 line 1), evaluated in the real env;
3. fit the probabilistic dynamics ensemble (Alg. 1 line 2);
4. MB2PO iterations: ``h``-step rollouts in the penalised model MDP + AWAC on mixed batches;
5. CSV logs (torchrl ``CSVLogger``), ``learning_curve.png``, ``summary.json``.

Every phase checkpoints atomically to ``output_dir/checkpoint.pt`` (``torch.load(...,
weights_only=True)`` loads it); re-running with the same ``output_dir`` resumes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
import tqdm
from omegaconf import DictConfig
from torchrl.record.loggers.csv import CSVLogger

from examples.mb2po import utils
from torchrl_depeff.algorithms.mb2po import MB2PO
from torchrl_depeff.envs.tasks import get_task

log = logging.getLogger("mb2po")


def run(cfg: DictConfig) -> dict:
    """Run (or resume) one MB2PO experiment; returns the summary."""
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # Dataset and real env
    data = utils.load_or_make_dataset(cfg, out_dir)
    log.info("dataset %s: %s", f"{cfg.task}-{cfg.dataset}", utils.dataset_summary(data))
    env = utils.make_real_env(cfg.task, cfg.seed + 100)
    task = get_task(cfg.task)

    # Algorithm
    config = utils.build_config(cfg)
    logger = CSVLogger(exp_name="mb2po", log_dir=str(out_dir))
    algo = MB2PO(data, config, termination_fn=task.termination_fn, logger=logger, device=cfg.device)

    ckpt_path = out_dir / "checkpoint.pt"
    history: list[dict] = []
    ckpt = utils.load_checkpoint(ckpt_path)
    if ckpt is not None:
        algo.load_state_dict(ckpt["algo"])
        history = list(ckpt["history"])
        log.info(
            "resumed from %s: %d pre-training steps, %d iterations",
            ckpt_path, algo.pretrain_steps_done, algo.iteration,
        )

    def checkpoint() -> None:
        utils.save_checkpoint({"algo": algo.state_dict(), "history": history}, ckpt_path)

    def evaluate(phase: str) -> dict:
        metrics = utils.evaluate_score(algo, env, cfg.task, cfg.eval.episodes, cfg.eval.max_steps)
        grad_steps = algo.pretrain_steps_done + algo.finetune_steps_done
        history.append(
            {
                "phase": phase,
                "grad_steps": grad_steps,
                "iteration": algo.iteration,
                "return": metrics["eval/return_mean"],
                "score": metrics["eval/normalized_score"],
            }
        )
        for key, value in metrics.items():
            logger.log_scalar(key, value, step=grad_steps)
        log.info("[%s] step %d: return %.1f, score %.1f", phase, grad_steps,
                 metrics["eval/return_mean"], metrics["eval/normalized_score"])
        return metrics

    # AWAC pre-training (Alg. 1 line 1), in chunks between evaluations/checkpoints
    remaining = config.pretrain_steps - algo.pretrain_steps_done
    if remaining > 0:
        chunk = max(1, int(cfg.eval.every_pretrain_steps))
        with tqdm.tqdm(total=config.pretrain_steps, initial=algo.pretrain_steps_done,
                       desc="AWAC pre-training", unit="step") as bar:
            while algo.pretrain_steps_done < config.pretrain_steps:
                n = min(chunk, config.pretrain_steps - algo.pretrain_steps_done)
                algo.pretrain(n)
                bar.update(n)
                evaluate("pretrain")
                checkpoint()
    awac_score = next((h["score"] for h in reversed(history) if h["phase"] == "pretrain"), None)

    # Dynamics (Alg. 1 line 2)
    if not algo.model_fitted:
        metrics = algo.fit_model()
        log.info("dynamics: %s", metrics)
        checkpoint()

    # MB2PO iterations
    every = max(1, int(cfg.eval.every_iterations))

    def after_iteration(iteration: int, metrics: dict) -> None:
        if iteration % every == 0 or iteration == config.num_iterations:
            evaluate("finetune")
        checkpoint()

    algo.train(progress=True, callback=after_iteration)
    if not history or history[-1]["phase"] != "finetune" or history[-1]["iteration"] != algo.iteration:
        evaluate("finetune")
        checkpoint()

    final = history[-1]
    summary = {
        "task": cfg.task,
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "awac_score": awac_score,
        "mb2po_score": final["score"],
        "mb2po_return": final["return"],
        "pretrain_steps": algo.pretrain_steps_done,
        "iterations": algo.iteration,
        "wall_s_this_run": time.perf_counter() - t0,
    }
    utils.plot_learning_curve(history, out_dir / "learning_curve.png", f"MB2PO {cfg.task}-{cfg.dataset}")
    utils.write_json({"summary": summary, "history": history}, out_dir / "summary.json")
    log.info("summary: %s", summary)
    env.close()
    return summary


@hydra.main(config_path=".", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
