"""k2serve: Kubernetes-native distributed serving for K2-class thinking MoE models.

How a request flows (each hop names the module that handles it):

1. ``k2serve.router.http`` (OpenAI-compatible HTTP) or ``k2serve.router.server`` (gRPC ``Generate``) receives
   the request and renders it with the model's chat template (``k2serve.k2format.chat_template``).
2. ``k2serve.router.schedule`` picks a prefill group (load- and prefix-aware) and a decode group (load).
3. The prefill group (``k2serve.worker.service`` in front of ``k2serve.worker.parallel.group``) runs the
   prompt through ``k2serve.worker.engine`` and hands the prompt's latent KV cache to the decode group
   through Ray's object store.
4. The decode group streams tokens back — all of the router's turns on that group over one ``DecodeMany``
   call, a message per engine step (``k2serve.router.mux``); the router appends each chain's progress to the chain store
   (``k2serve.router.chains``) and parses K2's reasoning and tool-call tokens for the client
   (``k2serve.router.http.k2_parse``).

The control plane (``k2serve.operator``) turns a ``K2Deployment`` into the Ray cluster, pools and router
that serve steps 1-4; it shares only ``k2serve.config`` with the other two planes.
"""

__version__ = "0.1.0"
