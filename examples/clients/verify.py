#!/usr/bin/env python3
"""How a downstream service verifies a Deputy token and reads both principals.

    pip install 'pyjwt[crypto]'
    python verify.py --issuer https://deputy.deputy-system.svc \
        --jwks https://deputy.deputy-system.svc/jwks.json --audience gdpr-compliance-service TOKEN

Deputy tokens are RFC 9068 access tokens (typ at+jwt) signed with EdDSA (or ES256). Pin the
issuer, the algorithms and your own audience; then `sub` is the human who authorised the task
and `act` names the agent run acting for them (nested `act` are earlier actors).
"""
import argparse
import sys

import jwt
from jwt import PyJWKClient


def actor_chain(act):
    """The acting identities, current actor first."""
    chain = []
    while act:
        chain.append(act["sub"])
        act = act.get("act")
    return chain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--issuer", required=True)
    p.add_argument("--jwks", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("token")
    a = p.parse_args()

    try:
        header = jwt.get_unverified_header(a.token)
        if header.get("typ", "").lower() not in ("at+jwt", "application/at+jwt"):
            raise jwt.InvalidTokenError("not an access token (typ is not at+jwt)")
        key = PyJWKClient(a.jwks, cache_keys=True).get_signing_key_from_jwt(a.token)
        claims = jwt.decode(
            a.token,
            key.key,
            algorithms=["EdDSA", "ES256"],
            audience=a.audience,
            issuer=a.issuer,
            leeway=30,
            options={"require": ["exp", "iat", "nbf", "iss", "sub", "aud", "act"]},
        )
    except jwt.PyJWTError as e:
        print(f"invalid: {e}")
        return 1

    chain = actor_chain(claims["act"])
    print(f"principal: {claims['sub']}")
    print(f"actor: {chain[0]}")
    for earlier in chain[1:]:
        print(f"  on behalf of earlier actor: {earlier}")
    print(f"scope: {claims.get('scope', '')}")
    print(f"run: {claims['run']['namespace']}/{claims['run']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
