"""Serving: the aligned CLIP model over HTTP on Ray Serve.

- `app.build_app(args)` builds the Serve application (the `import_path` of serve/config.yaml);
- `args.ServeArgs` the validated application args; `schemas` the HTTP request/response models;
- `limits` every request limit and the 4xx errors; `engine` the model-side math, without Ray;
- `local.serve_and_ask` starts the app locally and asks it about one image.

Nothing here imports Ray or torch at import time except `app` (and `engine`, torch).
"""
