"""`b12-cds test-token --aud URL`: a signed JWT for trying the service outside demo mode.

It signs with a local ES384 key (created on first use, mode 0600, next to its public JWKS
file) as the issuer `urn:b12-neck-cds:local-test`.  The service trusts that issuer only when
told to, like any EHR: `--print-config` prints the `CDS_TRUSTED_ISSUERS` value naming the JWKS
file.  The token is shaped like an EHR's (`iss`, `aud` = the exact URL called, `iat`, `exp`,
`jti`, `kid`), so it exercises the real verification path.  For local testing only: anyone with
the key file can sign requests the service accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

ISSUER = "urn:b12-neck-cds:local-test"
ALGORITHM = "ES384"
DEFAULT_KEY = "test-issuer-es384.pem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aud", metavar="URL",
                        help="the exact URL the token is for, e.g. http://127.0.0.1:8080/cds-services/"
                             "b12-neck-pain-patient-view (CDS_PUBLIC_BASE_URL + path behind a proxy)")
    parser.add_argument("--key", type=Path, metavar="FILE",
                        help=f"private key (created if missing; default: CDS_DATA_DIR/{DEFAULT_KEY})")
    parser.add_argument("--lifetime", type=int, default=300, metavar="SECONDS",
                        help="seconds until the token expires (default: %(default)s, at most 3600)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the CDS_TRUSTED_ISSUERS value that trusts this key, and exit")


def run(args: argparse.Namespace) -> int:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from jwt.algorithms import ECAlgorithm

    from cds_service.commands.fhir_client import CliError
    from cds_service.config import Settings
    from cds_service.security import MAX_TOKEN_LIFETIME_SECONDS, _load_or_create_key, jwk_thumbprint

    key_path = (args.key or Path(Settings.from_env().data_dir) / DEFAULT_KEY).resolve()
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        private = _load_or_create_key(key_path)
    except (OSError, ValueError) as err:
        raise CliError(f"--key {key_path}: {getattr(err, 'strerror', None) or err}") from None
    public = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    kid = jwk_thumbprint(public)
    jwks_path = key_path.with_suffix(".jwks.json")
    jwks = {"keys": [{**public, "kid": kid, "alg": ALGORITHM, "use": "sig"}]}
    if not jwks_path.exists() or json.loads(jwks_path.read_text()) != jwks:
        jwks_path.write_text(json.dumps(jwks, indent=2) + "\n")
        os.chmod(jwks_path, 0o644)
    config = json.dumps({ISSUER: {"jwks": str(jwks_path)}})
    if args.print_config:
        print(config)
        return 0
    if not args.aud:
        raise CliError("--aud URL is required (the exact URL the token will be sent to)")
    if not 0 < args.lifetime <= MAX_TOKEN_LIFETIME_SECONDS:
        raise CliError(f"--lifetime must be between 1 and {MAX_TOKEN_LIFETIME_SECONDS} seconds")
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": args.aud, "iat": now, "exp": now + args.lifetime, "jti": uuid.uuid4().hex}
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    print(jwt.encode(claims, pem, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"}))
    print(f"(the service trusts it with CDS_TRUSTED_ISSUERS='{config}')", file=sys.stderr)
    return 0
