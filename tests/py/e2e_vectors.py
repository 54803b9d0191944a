# PyNaCl's side of tests/tests/crypto_vectors.rs (byte-for-byte agreement of crypto_box).
"""Usage: python e2e_vectors.py < request.json > answer.json

The request is one JSON object (all byte strings as lowercase hex):

- "boxes": [{"sk_a", "sk_b", "nonce", "pt", "ours"}]: for each, answers
  {"pub_a", "pub_b"} (PrivateKey(sk).public_key), "ct" = Box(PrivateKey(sk_a),
  PublicKey(pub_b)).encrypt(pt, nonce).ciphertext, "opened_ours": whether B opens the Rust
  ciphertext "ours" to exactly pt, "tampered_rejected": whether a copy of "ours" with one bit
  flipped fails to open, and "random": a fresh PyNaCl sealing of pt from A to B with a random
  nonce ({"nonce", "ct"}) for Rust to open;
- "envelopes": [{"sk_a", "pub_b", "nonce", "extra"}]: "extra" is the JSON form of the
  original `extra` map ({"$bytes": hex} marks bytes, {"$float": x} a float); answers the
  "plaintext" and the whole "envelope", both packed with msgpack exactly as hypha-rpc
  0.21.47's rpc.py does (RemoteFunction.__call__);
- "low_order": a 32-byte public key for which to report whether PyNaCl refuses to make a Box.
"""
import json
import sys

import msgpack
import nacl
import nacl.exceptions
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random


def unhex(s):
    return bytes.fromhex(s)


def from_json(x):
    if isinstance(x, dict):
        if set(x) == {"$bytes"}:
            return unhex(x["$bytes"])
        if set(x) == {"$float"}:
            return float(x["$float"])
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    return x


def one_box(c):
    a, b = PrivateKey(unhex(c["sk_a"])), PrivateKey(unhex(c["sk_b"]))
    pt, nonce, ours = unhex(c["pt"]), unhex(c["nonce"]), unhex(c["ours"])
    ct = Box(a, b.public_key).encrypt(pt, nonce).ciphertext
    opener = Box(b, a.public_key)
    try:
        opened = opener.decrypt(ours, nonce) == pt
    except nacl.exceptions.CryptoError:
        opened = False
    tampered = bytearray(ours)
    tampered[len(tampered) // 2] ^= 0x01
    try:
        opener.decrypt(bytes(tampered), nonce)
        rejected = False
    except nacl.exceptions.CryptoError:
        rejected = True
    rnonce = nacl_random(Box.NONCE_SIZE)
    rct = Box(a, b.public_key).encrypt(pt, rnonce).ciphertext
    return {
        "pub_a": bytes(a.public_key).hex(),
        "pub_b": bytes(b.public_key).hex(),
        "ct": ct.hex(),
        "opened_ours": opened,
        "tampered_rejected": rejected,
        "random": {"nonce": rnonce.hex(), "ct": rct.hex()},
    }


def one_envelope(c):
    """The `extra` segment as rpc.py builds it when it encrypts a call."""
    priv = PrivateKey(unhex(c["sk_a"]))
    extra_data = from_json(c["extra"])
    plaintext = msgpack.packb(extra_data)
    nonce = unhex(c["nonce"])
    # hypha_rpc.crypto.encrypt_payload, with the nonce given instead of nacl.utils.random
    ciphertext = Box(priv, PublicKey(unhex(c["pub_b"]))).encrypt(plaintext, nonce).ciphertext
    envelope = {
        "_enc": {"v": 2, "pub": bytes(priv.public_key), "nonce": nonce},
        "data": ciphertext,
    }
    return {"plaintext": plaintext.hex(), "envelope": msgpack.packb(envelope).hex()}


def low_order(pub_hex):
    try:
        Box(PrivateKey(b"\x01" * 32), PublicKey(unhex(pub_hex)))
        return {"refused": False}
    except Exception as e:  # noqa: BLE001 - the test reports the text
        return {"refused": True, "error": f"{type(e).__name__}: {e}"}


def main():
    req = json.load(sys.stdin)
    out = {
        "versions": {"pynacl": nacl.__version__, "msgpack": ".".join(map(str, msgpack.version))},
        "boxes": [one_box(c) for c in req.get("boxes", [])],
        "envelopes": [one_envelope(c) for c in req.get("envelopes", [])],
    }
    if "low_order" in req:
        out["low_order"] = low_order(req["low_order"])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
