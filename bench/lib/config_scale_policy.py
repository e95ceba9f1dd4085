#!/usr/bin/env python3
"""Mesh policies for bench/config_scale.sh (Python stdlib only).

    config_scale_policy.py --services N [--step K] [--consumes C]   (N = 0: the 4-service lab policy)

Prints a policy document (version 1) on stdout:

* uplinks wifi (cost 1) and lte (metered, cost 5); classes as in bench/lib/lab.sh
  without dsrc: critical [wifi, lte], standard [wifi, lte], bulk [wifi] (deferrable),
  all timeout 5s, 1 retry, max_loss_percent 50;
* N > 0: N cloud services `svc-<i>` (i = 0..N-1), class round robin by i % 3
  (critical, standard, bulk: N/3 each), route prefix `/svc-<i>`, port 8080, one
  endpoint 198.18.0.<2 + i % 200>:<8000 + i % 100>, every 4th service a second one
  127.0.0.1:<20000 + i>; plus 4 vehicle services `vsvc-<k>` (127.0.0.1:<18090 + k>,
  `/vsvc-<k>`, class standard);
* N = 0: the lab's services (maps standard, telemetry bulk, hazard-alerts critical at
  the edge, diagnostics on the vehicle), endpoints as in bench/vehicle_loop.sh.

--consumes C (N > 0): every vehicle service declares `consumes: [svc-0 .. svc-<C-1>]`
(C >= 2 includes the edit target), so a vehicle holds only those C cloud services;
without it nothing is declared.

--step K applies the first K of these cumulative edits (each step is one edit of one
thing relative to step K-1), to the edit target T (`svc-1`, class standard; lab: `maps`):

  1 endpoint   T's first endpoint becomes 198.18.0.250:9999
  2 route      T's route prefix gets `-v2` appended
  3 class      class `standard` timeout 5s -> 7s (every standard service's routes)
  4 svc-class  T moves from class standard to bulk
"""

import argparse
import sys

STEPS = ["base", "endpoint", "route", "class", "svc-class"]

HEAD = """version: 1
uplinks:
  - { name: wifi, kind: wifi, cost: 1 }
  - { name: lte, kind: lte, metered: true, cost: 5 }
classes:
  - { name: critical, timeout: 5s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }
  - { name: standard, timeout: %(std_timeout)s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }
  - { name: bulk, timeout: 5s, retries: 1, uplinks: [wifi], deferrable: true, max_loss_percent: 50 }
services:
"""

CLASSES = ["critical", "standard", "bulk"]


def svc_line(name, location, port, endpoints, route, cls, consumes=None):
    eps = ", ".join('"%s"' % e for e in endpoints)
    ep = (", endpoints: [%s]" % eps) if endpoints else ""
    cons = (", consumes: [%s]" % ", ".join(consumes)) if consumes is not None else ""
    return "  - { name: %s, location: %s, port: %d%s, routes: [%s], class: %s%s }\n" % (
        name, location, port, ep, route, cls, cons)


def services(n):
    """(name, location, port, endpoints, route, class) of every service, target first-class."""
    if n == 0:
        return [
            ["maps", "cloud", 18080, ["198.18.0.1:18080"], "/maps", "standard"],
            ["telemetry", "cloud", 18080, ["198.18.0.1:18080"], "/telemetry", "bulk"],
            ["hazard-alerts", "edge", 18080, ["198.18.0.1:18080"], "/hazards", "critical"],
            ["diagnostics", "vehicle", 18090, [], "/diagnostics", "standard"],
        ]
    out = []
    for i in range(n):
        eps = ["198.18.0.%d:%d" % (2 + i % 200, 8000 + i % 100)]
        if i % 4 == 0:
            eps.append("127.0.0.1:%d" % (20000 + i))
        out.append(["svc-%d" % i, "cloud", 8080, eps, "/svc-%d" % i, CLASSES[i % 3]])
    for k in range(4):
        out.append(["vsvc-%d" % k, "vehicle", 18090 + k, [], "/vsvc-%d" % k, "standard"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, required=True)
    ap.add_argument("--step", type=int, default=0, choices=range(len(STEPS)))
    ap.add_argument("--consumes", type=int, default=None)
    a = ap.parse_args()
    svcs = services(a.services)
    target = svcs[0] if a.services == 0 else svcs[1]
    assert target[5] == "standard"
    std_timeout = "5s"
    if a.step >= 1:
        target[3] = ["198.18.0.250:9999"] + target[3][1:]
    if a.step >= 2:
        target[4] = target[4] + "-v2"
    if a.step >= 3:
        std_timeout = "7s"
    if a.step >= 4:
        target[5] = "bulk"
    out = [HEAD % {"std_timeout": std_timeout}]
    consumes = None
    if a.consumes is not None and a.services > 0:
        consumes = ["svc-%d" % i for i in range(min(a.consumes, a.services))]
    out.extend(svc_line(*s, consumes=consumes if s[1] == "vehicle" else None) for s in svcs)
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
