#!/usr/bin/env python3
"""Push files as an OCI artifact with the PyPI `oras` client, pull them back, and print what happened as JSON.

Run by e2e/tests/registry_interop.rs against the controller's registry:

    ORAS_USER=alki ORAS_PASS=<token> oras-roundtrip.py --registry 127.0.0.1:7080 \
        --repository acme/oras --tag v1 --work DIR [--chunked] FILE...

Credentials come from ORAS_USER/ORAS_PASS (never argv) and go through oras' "basic" auth backend: the first
request of each call goes out without credentials, the registry answers 401 with `WWW-Authenticate: Basic`,
and oras retries with them. oras' default "token" backend expects a token server, which Alki does not run.
"""

import argparse
import json
import os
import sys

try:
    import oras.provider
except ImportError:
    sys.exit("the PyPI oras client is not installed; install it with `pip install oras` (.ci/run installs it for CI)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="host:port, plain HTTP")
    parser.add_argument("--repository", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--work", required=True, help="directory holding the files; pulls go to <work>/pulled-<tag>")
    parser.add_argument("--chunked", action="store_true", help="PATCH 64 KiB chunks instead of one POST per blob")
    parser.add_argument("files", nargs="+", help="file names relative to --work")
    args = parser.parse_args()
    if not (os.environ.get("ORAS_USER") and os.environ.get("ORAS_PASS")):
        sys.exit("set ORAS_USER and ORAS_PASS (the password is an Alki token with the push role or higher)")

    os.chdir(args.work)
    client = oras.provider.Registry(hostname=args.registry, insecure=True, auth_backend="basic")
    target = f"{args.registry}/{args.repository}:{args.tag}"
    response = client.push(
        target=target,
        files=args.files,
        manifest_annotations={"org.opencontainers.image.description": "alki interop test"},
        do_chunked=args.chunked,
        chunk_size=64 * 1024,
        quiet=True,
    )
    if response.status_code != 201:
        sys.exit(f"pushing {target} answered {response.status_code}: {response.text}")
    pulled_dir = os.path.join(args.work, f"pulled-{args.tag}")
    pulled = client.pull(target=target, outdir=pulled_dir)
    manifest = client.get_manifest(target)
    tags = client.get_tags(f"{args.registry}/{args.repository}")
    json.dump(
        {
            "digest": response.headers.get("Docker-Content-Digest"),
            "pulled": sorted(os.path.relpath(p, pulled_dir) for p in pulled),
            "pulled_dir": pulled_dir,
            "layers": [layer["digest"] for layer in manifest.get("layers", [])],
            "tags": tags,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
