#!/usr/bin/env python3
"""Writes a known-answer vector file for the `ike` crate's tests from one run of
../shared/ikev2-lab/lab.sh (a real strongSwan 5.9.8 initiator g1 and responder g2).

usage: make-vectors.py SCENARIO_DIR PSK > vectors.txt     (PSK: "" for a certificate run)

Reads g1/charon.log (written with `ike = 4`, `chd = 4`: lab keys only) and underlay.pcap.
Every IKE datagram of the capture is written in order with its direction (i: from the
initiator, r: from the responder), the non-ESP marker of port 4500 removed; the keys charon
logged are written under the names RFC 7296 uses. Nothing is computed here: the tests
derive everything from the datagrams and the DH secret and compare with charon's values.
"""
import re, subprocess, sys, os

d, psk = sys.argv[1], sys.argv[2]
log = open(os.path.join(d, "g1", "charon.log")).read().splitlines()
head = re.compile(r"\] <[^>]*> (.+?) => (\d+) bytes @")
row = re.compile(r"\] <[^>]*>\s+\d+: ((?:[0-9A-F]{2} ?){1,16})")
dumps, i = [], 0
while i < len(log):
    m = head.search(log[i])
    if not m:
        i += 1
        continue
    label, n, data = m.group(1), int(m.group(2)), b""
    i += 1
    while len(data) < n and i < len(log) and row.search(log[i]):
        data += bytes.fromhex(row.search(log[i]).group(1).replace(" ", ""))
        i += 1
    dumps.append((label, data[:n]))

def nth(label, k=0):
    return [x for l, x in dumps if l == label][k]

out = [f"# strongSwan 5.9.8 lab run {os.path.basename(os.path.normpath(d))!r}: initiator g1 192.0.2.1, responder g2 192.0.2.2"]
if psk:
    out.append("psk = " + psk.encode().hex())
names = [("shared Diffie Hellman secret", "g_ir"), ("SKEYSEED", "skeyseed"), ("Sk_d secret", "sk_d"),
         ("Sk_ei secret", "sk_ei"), ("Sk_er secret", "sk_er"), ("Sk_pi secret", "sk_pi"),
         ("Sk_pr secret", "sk_pr")]
for k in range(2):
    for label, name in names:
        try:
            out.append(f"{name}.{k} = " + nth(label, k).hex())
        except IndexError:
            pass
out.append("child_i2r = " + nth("encryption initiator key").hex())
out.append("child_r2i = " + nth("encryption responder key").hex())
rows = subprocess.run(["tshark", "-r", os.path.join(d, "underlay.pcap"), "-Y", "isakmp",
                       "-T", "fields", "-e", "ip.src", "-e", "udp.srcport", "-e", "udp.payload"],
                      capture_output=True, text=True, check=True).stdout.split("\n")
for r in rows:
    if not r.strip():
        continue
    src, port, payload = r.split("\t")
    data = bytes.fromhex(payload.replace(":", ""))
    if port == "4500":
        assert data[:4] == b"\0\0\0\0", "no non-ESP marker"
        data = data[4:]
    out.append(("msg.i = " if src == "192.0.2.1" else "msg.r = ") + data.hex())
print("\n".join(out))
