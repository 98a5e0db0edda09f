"""``fedbus coordinator``: publish a task and aggregate updates as they arrive."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import click

from coordinator.config import ENV_PREFIX, CoordinatorConfig
from fedbus.cli._options import TLS_HELPS, config_options, load_process_config

__all__ = ["coordinator"]

log = logging.getLogger("fedbus.coordinator")

HELPS = {
    "host": "Broker host.",
    "port": "Broker port (default 8883 with TLS, 1883 without).",
    "username": "MQTT username of the coordinator account.",
    "password": "MQTT password; prefer the environment variable over the flag.",
    "credentials": "credentials.json from `fedbus broker`: supplies host, port, prefix, "
    "password, the CA and the signing key (its TLS port unless --no-tls or --port is given).",
    **TLS_HELPS,
    "prefix": "Topic prefix shared with the agents.",
    "task_id": "Name of this learning task; agents train only for the current task.",
    "arch": "Model architecture from the zoo (mlp, cnn, cnn1d).",
    "model_args": "Architecture arguments as a JSON object, e.g. '{\"hidden\": [64]}'.",
    "epochs": "Local epochs per update on each device.",
    "batch_size": "Local minibatch size.",
    "lr": "Local learning rate (SGD).",
    "momentum": "Local SGD momentum.",
    "weight_decay": "Local weight decay.",
    "qat": "Quantization-aware training on the devices (int8 weights and activations).",
    "codec": "Update codec spec the devices use: fp32, fp16, int8, int4 or "
    "topk:FRACTION[:fp32|fp16|int8|int4] (share of values kept, and their codec; "
    "default int8), each optionally +zstd; e.g. int4+zstd, topk:0.05:int8+zstd.",
    "model_codec": "Codec of the global model broadcast: fp32 or fp16, optionally +zstd.",
    "max_update_bytes": "Largest update accepted, in bytes. Default: derived from the model "
    "(twice the largest update any codec can make of it, plus room for metrics; the demo "
    "mlp gets 299,783), at most the broker's packet limit; a resumed run keeps its own.",
    "max_message_bytes": "The broker's max_packet_size, assumed until its CONNACK announces "
    "its own; a larger model goes in chunks. The coordinator asks the broker for no packet "
    "larger than it needs (its largest update or model message, plus 1 KiB).",
    "chunk_memory_per_device": "Chunked updates: most bytes one device's partial updates may "
    "hold (0: twice --max-update-bytes plus 64 KiB); a chunk over it is refused and its "
    "partial update dropped.",
    "chunk_memory": "Chunked updates: most bytes all partial updates may hold together.",
    "chunk_timeout": "Chunked updates: seconds without a new chunk after which a partial "
    "update is dropped (logged and counted).",
    "seed": "Seed of the initial model.",
    "min_devices": "Publish the task only once this many devices are online (0: at once), "
    "so training starts with the whole fleet, not with the first device to connect.",
    "mode": "Aggregation: fedbuff (async, buffered), fedasync (K=1) or fedavg (synchronous).",
    "buffer_size": "FedBuff: apply after this many buffered updates (K).",
    "buffer_timeout": "FedBuff: apply fewer than K updates once the oldest has waited this "
    "many seconds (0: never), so a small or sleepy fleet cannot stall the model.",
    "server_lr": "Server learning rate applied to the aggregated change.",
    "server_momentum": "Server momentum of the sgd server optimizer (0 disables it).",
    "server_optimizer": "How each step's aggregate moves the model: sgd (server_lr x the "
    "aggregate, with --server-momentum), adam or yogi (FedAdam, FedYogi: per-coordinate "
    "steps of about --server-lr, e.g. 0.01; fedbuff and fedasync only).",
    "server_beta1": "adam/yogi: decay of the first moment (the aggregate's running mean).",
    "server_beta2": "adam/yogi: decay of the second moment (the aggregate's running square).",
    "server_tau": "adam/yogi: added to the root of the second moment (the adaptivity).",
    "staleness": "Staleness weighting: sqrt (1/sqrt(1+s)), poly ((1+s)^-a), hinge (1 up to "
    "b versions, then 1/(a(s-b)+1)) or constant.",
    "staleness_a": "Staleness weighting: the exponent a of poly, the slope a of hinge.",
    "staleness_b": "Staleness weighting: hinge keeps full weight up to b versions behind.",
    "max_staleness": "Reject updates more than this many versions behind (a hard bound: "
    "below it an update counts with its staleness weight, so a slow device is heard).",
    "fleet_scaling": "FedBuff: K and the staleness limit follow the devices online "
    "(K = max(--buffer-size, ceil(sqrt N)); limit max(--max-staleness, 4N/K), at most 1000, "
    "the bound the task announces). Off: the fixed settings; for up to 16 devices both are "
    "the same.",
    "adaptive_k": "FedBuff: K follows the devices' speeds, as the coordinator measures them "
    "from its own arrival times: the number of devices about as fast (within 1.5x) as the "
    "--buffer-size-th fastest, at least --buffer-size, at most the devices online (equal "
    "speeds: the whole fleet, synchronous steps; mixed speeds: the fast group); quorum then "
    "steps a full buffer with the updates that agree, not waiting beyond K. With mixed speeds "
    "use --staleness-a 0.5. Not with --fleet-scaling or differential privacy.",
    "concurrency": "FedBuff: at most this many devices train at a time, each invited by the "
    "coordinator (protocol revision 2.10); a fleet of at most this many is invited whole. "
    "Default 100 with --fleet-scaling, else 0 (no limit: every device trains whenever it can).",
    "invite_timeout": "Seconds an invited device may take to send its update before its slot "
    "goes to another device.",
    "max_norm": "Fixed ceiling: reject updates whose L2 norm exceeds it, whatever the "
    "adaptive bound says.",
    "norm_multiple": "Adaptive norm bound: clip updates above this multiple of the median L2 "
    "norm of the last --norm-window accepted updates (before 8 are known: above "
    "--norm-warmup x the global model's norm); 0 switches it off and leaves only --max-norm. "
    "Default 2, and off with --dp-noise.",
    "norm_warmup": "Adaptive norm bound, start of a run: until 8 norms are known, clip "
    "updates above this multiple of the global model's L2 norm (nothing is refused then). "
    "Default 4.",
    "norm_reject": "Adaptive norm bound: reject updates above this multiple of the clip "
    "bound (reason norm) instead of clipping them. Default 4.",
    "norm_window": "Adaptive norm bound: how many recently accepted norms it is taken from "
    "(default 64).",
    "round_deadline": "FedAvg: seconds to wait for a round's devices.",
    "aggregator": "How a step combines its updates: quorum (the default for a new run, a "
    "resumed run keeps its own: agree's step over updates first shortened to 2x the step's "
    "median norm, and a full FedBuff buffer waits, up to 2K, until K of its updates agree), "
    "agree (the mean of the updates on the side of the step's coordinate-wise median), "
    "median, mean (sample-weighted, trusts the claimed counts), "
    "trimmed:FRACTION (dropped from each end) or krum:F[:M] (F hostile updates assumed), "
    "optionally "
    "+clip:BOUND (every update scaled down to that L2 norm first); "
    "the mean also takes +cap:MULTIPLE (a claimed sample count weighs at most MULTIPLE x the "
    "median claim of its step); e.g. median, trimmed:0.2, krum:1+clip:5, mean+cap:2. Robust "
    "ones count each update once. Part of the run: a restart asking for another one is "
    "refused. With --dp-noise the default is mean, and only mean is accepted.",
    "dp_noise": "Central differential privacy: the noise multiplier sigma (0: off). Every "
    "step gets Gaussian noise of std sigma x --dp-clip / K, K being --buffer-size (1 in "
    "fedasync); needs --aggregator mean (the default with it) and switches the adaptive norm "
    "bound off (--dp-clip is the bound; the --norm-* settings are refused with it, except "
    "--norm-multiple 0). Part of the run.",
    "dp_clip": "Differential privacy: the L2 bound every update is clipped to (C). Part of the "
    "run.",
    "dp_delta": "Differential privacy: the delta at which epsilon is reported.",
    "dp_epsilon_budget": "Differential privacy: end the run before a step would spend more "
    "than this epsilon (0: no budget).",
    "min_round_updates": "FedAvg: fewest updates that close a round at its deadline.",
    "eval_data": "Held-out data (.csv/.npz/dir) to evaluate every model version.",
    "normalize": "Input normalisation the task carries; every device applies it before "
    "training: auto (mean and std of each feature of --eval-data when that is a .csv file "
    "or a directory of them), eval (the same for any --eval-data), off, or a JSON file "
    "{\"mean\": [...], \"std\": [...]} (or {\"scale\": [...], \"offset\": [...]}). Fixed "
    "for a run.",
    "classes": "Class names, comma-separated, in class-index order: labels are then names "
    "(e.g. benign,malignant). Default: the sorted names of --eval-data's labels when they "
    "are names, else none (labels are class indices). Fixed for a run.",
    "stall_window": "Warn when no update was accepted for this many seconds while some were "
    "rejected (0: never).",
    "ingest_workers": "Worker processes that decode and check update deltas beside this "
    "one, which still judges, stores and acknowledges every message in arrival order (0: "
    "none, all in this process). Helps only with spare cores: see docs/operations.md.",
    "state_dir": "Directory holding the run (state.db, model.npz, model_best.npz, "
    "history.jsonl) and the "
    "signing key (signing.key, signing.pub). A restart on "
    "it resumes the run where it stopped; empty: keep nothing (memory only).",
    "require_signed_updates": "Refuse every update that is not signed with its device's own "
    "key (protocol revision 2.8; receipt reason signature): devices need a key, made by "
    "`fedbus devices add` or `bundle`.",
    "device_keys": "The device-key file (<device-id> ed25519:<key> per line), read again "
    "whenever it changes. Default: signing/devices.pub beside --credentials.",
    "signing_key": "Ed25519 private key (PEM) to sign tasks and models with, copied into a "
    "state directory that has no signing.key yet (then ignored). Default: the credentials "
    "file's signing key; with neither, a new key is made in the state directory.",
    "sync": "Durability of the state: normal survives a crash of this process at any instant; "
    "full also an operating-system crash or power cut (one fsync per update).",
    "connect_timeout": "Exit with an error after this many seconds without a broker "
    "connection (0: retry forever).",
    "start": "running, or paused: begin paused (no model version is made and agents do not "
    "train) until `fedbus run resume`. A run paused before stays paused either way.",
    "device_share": "Fairness: the share (0-1) of the CPU time the coordinator spends handling "
    "messages that one device may use, sustained; a device over it (a flood) gets its "
    "updates refused unjudged, with a rate_limited receipt saying when to send again, so it "
    "cannot delay the others. 0: off. An agent sending one small update every "
    "few seconds uses under 0.1%.",
    "device_burst": "Fairness: seconds of CPU time a device that has been quiet may use at "
    "once before --device-share applies.",
    "max_versions": "Stop after this many model versions (0: never).",
    "duration": "Stop after this many seconds (0: never).",
    "target_accuracy": "Stop once held-out accuracy reaches this and held (see "
    "--target-hold; 0: never).",
    "target_hold": "Seconds the target must hold: a version reached --target-accuracy and, "
    "of the versions evaluated in the following SECONDS, at least 90% reached it too "
    "(versions not evaluated, when they come faster than evaluation, do not count; none "
    "evaluated counts as held). 0: stop at the first version that reaches it.",
    "metrics_port": "Serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: off).",
    "metrics_host": "Address the metrics endpoint listens on (default loopback only).",
    "dashboard_port": "Serve the live web dashboard on http://DASHBOARD_HOST:PORT/ (0: off).",
    "dashboard_host": "Address the dashboard listens on (default loopback only; it has no "
    "login: reach it through an SSH tunnel or a proxy that asks for one).",
}


@click.command(
    epilog="Settings come from flags, then FEDBUS_COORDINATOR_* environment variables, then "
    "the [coordinator] table of --config, then defaults."
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None,
    help="TOML file with a [coordinator] table of the settings below.",
)
@click.option(
    "--new-run", is_flag=True, default=False,
    help="Start a new run in --state-dir even though it holds one (the old run is moved to "
    "<state-dir>/runs/<run id>/, never deleted).",
)
@config_options(CoordinatorConfig, HELPS, ENV_PREFIX)
def coordinator(config_file: Path | None, new_run: bool, **flags: Any) -> None:
    """Run the coordinator: publish the task, aggregate updates, publish new models.

    It keeps the run in --state-dir and publishes the task and the current model as
    retained messages, validates every update (rejecting bad ones with a reason, sent
    back as a receipt), folds accepted ones into the global model and publishes each new
    version. With --eval-data it logs held-out accuracy per version.

    Ctrl-C or SIGTERM stops this process; started again on the same --state-dir it resumes
    the same run at the same version, with the updates it had accepted. The run ends at
    --max-versions, --duration or --target-accuracy (once it held for --target-hold
    seconds): the coordinator then applies what it holds, tells the devices the run has
    ended, and exits. The operator pauses, resumes and stops the run from anywhere with
    `fedbus run pause|resume|stop`. The state directory keeps the last model (model.npz)
    and the best evaluated one (model_best.npz).

    \b
    Example, against a broker started with `fedbus broker --dir ./trial`:
      fedbus coordinator --credentials ./trial/credentials.json \\
                         --eval-data ./test.npz --state-dir ./run
    """
    from coordinator.process_setup import set_up_process
    from coordinator.service import CoordinatorService, freeze_heap
    from fedbus.datasets import load_local_data

    cfg, password = load_process_config(
        CoordinatorConfig, flags, env_prefix=ENV_PREFIX, config_file=config_file,
        section="coordinator",
        username=lambda c: c.username,
    )
    set_up_process()
    eval_data = load_local_data(cfg.eval_data) if cfg.eval_data is not None else None
    service = CoordinatorService(cfg, password=password, eval_data=eval_data, new_run=new_run)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    freeze_heap()
    summary = service.run()
    counters = summary.counters
    log.info(
        "done (%s): %d versions, final accuracy %s, best %s, %d updates accepted, %d rejected",
        summary.stop_reason, summary.final_version,
        "n/a" if summary.final_accuracy is None else f"{summary.final_accuracy:.4f}",
        "n/a" if summary.best_accuracy is None else
        f"{summary.best_accuracy:.4f} (v{summary.best_version})",
        counters.get("updates_accepted", 0), counters.get("updates_rejected", 0),
    )
    if summary.privacy is not None:
        log.info(
            "differential privacy: epsilon %.4g at delta %g after %d steps (noise multiplier "
            "%g, clip %g)", summary.privacy["epsilon"], summary.privacy["delta"],
            summary.privacy["steps"], summary.privacy["noise_multiplier"],
            summary.privacy["clip"],
        )
    rejected = {
        k[len("rejected_"):]: v for k, v in counters.items() if k.startswith("rejected_") and v
    }
    if rejected:
        log.info("rejections by reason: %s", json.dumps(rejected))
