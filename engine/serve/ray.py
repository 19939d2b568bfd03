"""Replicas of the server on Ray Serve, for when one machine (or one GPU) is not enough: each
replica is the same ASGI app as ``python -m engine.serve``, with its own model and scheduler, and
Ray's proxy spreads the requests over them. Needs the ``ray`` extra: ``pip install -e ".[ray]"``.

    serve run engine.serve.ray:app                                  # gpt2, one replica
    serve run engine.serve.ray:build model=gpt2-xl replicas=8        # eight replicas (one GPU each)
    serve deploy engine/serve/ray_config.yaml                        # autoscaling, from the config

``build``'s arguments (``key=value`` on ``serve run``, or ``args`` in the config file): model,
served_model_name, device, dtype, backend, quantize, max_batch, max_waiting, max_context,
request_timeout, api_key; replicas (a fixed count; the config file's ``autoscaling_config``
instead scales between bounds); num_gpus per replica (default: 1 where the cluster has GPUs, else 0);
num_cpus per replica (default 1).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ..errors import ParameterError

OPTIONS = ("model", "served_model_name", "device", "dtype", "backend", "quantize", "max_batch", "max_waiting",
           "max_context", "request_timeout", "api_key")


def _number(args: dict, name: str, kind: type, default):
    value = args.get(name, default)
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        raise ParameterError(name, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") \
            from None


def replica_app(options: dict[str, Any]):
    """The ASGI app of one replica (run on the replica when it starts): load the model, make its
    scheduler and the server's app, as ``python -m engine.serve`` does with the same options."""
    from ..model.loader import load_model
    from ..core.scheduler import Scheduler
    from .app import create_app
    from .defaults import MAX_WAITING, server_dtype, server_max_batch

    dtype = options.get("dtype") or server_dtype(options.get("device"), options.get("quantize"))
    model = load_model(options.get("model", "gpt2"), device=options.get("device"), dtype=dtype,
                       backend=options.get("backend"), quantize=options.get("quantize"))
    max_batch = _number(options, "max_batch", int, None) or server_max_batch(model.device.type)
    scheduler = Scheduler(model, max_batch=max_batch, max_waiting=_number(options, "max_waiting", int, MAX_WAITING),
                          max_context=_number(options, "max_context", int, None))
    name = options.get("served_model_name") or options.get("model", "gpt2")
    return create_app(scheduler, name, options.get("api_key"), _number(options, "request_timeout", float, None))


def _cluster_gpus() -> float:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0)
    import torch

    return torch.cuda.device_count()


def build(args: dict[str, Any]) -> serve.Application:
    """A Ray Serve application of ``replicas`` replicas of the server (see the module docstring)."""
    unknown = sorted(set(args) - set(OPTIONS) - {"replicas", "num_gpus", "num_cpus"})
    if unknown:
        raise ParameterError(unknown[0], f"unknown argument {unknown[0]!r}; known: "
                                         f"{', '.join(OPTIONS + ('replicas', 'num_gpus', 'num_cpus'))}")
    options = {k: v for k, v in args.items() if k in OPTIONS}
    num_gpus = _number(args, "num_gpus", float, None)
    if num_gpus is None:
        num_gpus = 1 if _cluster_gpus() > 0 else 0
    replicas = _number(args, "replicas", int, 1)

    class GPT2Server:
        """One replica: the server's app, built on the replica (``replica_app``)."""

    ingress = serve.ingress(lambda: replica_app(options))(GPT2Server)
    deployment = serve.deployment(ingress, name="gpt2engine", num_replicas=replicas,
                                  ray_actor_options={"num_gpus": num_gpus,
                                                     "num_cpus": _number(args, "num_cpus", float, 1)},
                                  max_ongoing_requests=4 * (_number(options, "max_batch", int, None) or 64))
    return deployment.bind()


app = build({})  # ``serve run engine.serve.ray:app``: gpt2 with the server's defaults, one replica
