"""Serving: the aligned CLIP model over HTTP on Ray Serve.

- `app.build_app(args)` builds the Serve application (the `import_path` of serve/config.yaml), whose
  deployments take their `user_config` in `reconfigure`; `app.local_app` the same from one ServeConfig;
- `args`: the app's args, each deployment's user_config and the flat `ServeConfig`, validated (and a
  whole Serve config checked: `check_application`); `schemas` the HTTP request/response models;
- `limits` every request limit and the 4xx errors (the model-side math is po_cluster.model.release);
- `local.serve_and_ask` starts the app locally and asks it about one image.

At import time Ray is imported by `app` (the Serve deployments) and `client` (handle calls and
Serve's errors) only; `local` and `observe` import it inside the functions that start Serve or
record its metrics. torch comes with the model code, through model.release (and so `gateway`, `api`,
`app` and `client`). The rest (`args`, `schemas`, `limits`, `auth`, `ratelimit`, `catalog`,
`ingress`) imports neither.
"""
