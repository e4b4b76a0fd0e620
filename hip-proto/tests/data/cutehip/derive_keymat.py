"""Writes cutehip-kij.txt and keymat.txt for each recorded run (README.md, "KEYMAT").

Kij comes from cutehip's log ("Secret key N", an integer), written here at its full
length (32/48 octets for P-256/P-384, 384 for MODP-3072). KEYMAT is HIP-KDF (RFC 7401
§6.5) computed here with Python's hmac, independently of hip-proto: RFC 5869 extract
and expand with salt #I | #J (from R1's PUZZLE and I2's SOLUTION), IKM Kij, info the
two HITs sorted; RHASH from the Responder's HIT suite (OGA 1: SHA-256, 2: SHA-384).
keymat.txt holds its first 64 octets, hex."""

import hashlib, hmac, os, struct, sys

here = os.path.dirname(os.path.abspath(__file__))


def params(pkt):
    off, out = 40, {}
    while off < len(pkt):
        t, n = struct.unpack(">HH", pkt[off : off + 4])
        out.setdefault(t, pkt[off + 4 : off + 4 + n])
        off += 11 + n - (n + 3) % 8
    return out


for run in sorted(os.listdir(here)):
    d = os.path.join(here, run)
    if not os.path.isfile(os.path.join(d, "kij.dec")):
        continue
    line = open(os.path.join(d, "kij.dec")).read().split()
    os.remove(os.path.join(d, "kij.dec"))
    pk = {}
    for l in open(os.path.join(d, "packets.txt")):
        ty, _, _, h = l.split()
        pk.setdefault(ty, bytes.fromhex(h))
    if not line or "I2" not in pk:
        continue
    group = params(pk["R1"])[513][0]
    size = {7: 32, 8: 48, 4: 384}[group]
    kij = int(line[-1]).to_bytes(size, "big")
    open(os.path.join(d, "cutehip-kij.txt"), "w").write(kij.hex() + "\n")
    r1, i2 = pk["R1"], pk["I2"]
    hash_ = {1: hashlib.sha256, 2: hashlib.sha384}[r1[11] & 0x0F]
    sol = params(i2)[321]
    n = (len(sol) - 4) // 2
    i, j = sol[4 : 4 + n], sol[4 + n :]
    hits = sorted([i2[8:24], i2[24:40]])
    prk = hmac.new(i + j, kij, hash_).digest()
    okm, t, c = b"", b"", 1
    while len(okm) < 64:
        t = hmac.new(prk, t + hits[0] + hits[1] + bytes([c]), hash_).digest()
        okm += t
        c += 1
    open(os.path.join(d, "keymat.txt"), "w").write(okm[:64].hex() + "\n")
    print(run, "group", group, "kij", len(kij), "keymat", okm[:8].hex())
