#!/bin/sh
# Capture the DHCP packets that qemu's iPXE ROM sends, for the golden tests in tests/unit/test_dhcp_golden.py.
# Run as root:  sh tests/data/dhcp/capture_ipxe.sh OUT.pcap [PROXY_CMD...]
# Topology (names and subnet reserved for the dhcp tests): netns dhcpt-cap, bridge dhbr0 10.78.0.1/24,
# tap dhtap0 for the VM; dnsmasq as the plain site DHCP server. An optional proxy command runs in the
# same namespace (e.g. Cello's proxy) so the ROM also makes its port-4011 request.
set -eu
OUT=$(readlink -f "$1"); shift
NS=dhcpt-cap
W=$(mktemp -d)
cleanup() {
  [ -f "$W/qemu.pid" ] && kill "$(cat "$W/qemu.pid")" 2>/dev/null || true
  [ -f "$W/dnsmasq.pid" ] && kill "$(cat "$W/dnsmasq.pid")" 2>/dev/null || true
  [ -f "$W/tcpdump.pid" ] && kill "$(cat "$W/tcpdump.pid")" 2>/dev/null || true
  [ -f "$W/proxy.pid" ] && kill "$(cat "$W/proxy.pid")" 2>/dev/null || true
  sleep 0.5
  ip netns del $NS 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add $NS
ip netns exec $NS ip link set lo up
ip netns exec $NS ip link add dhbr0 type bridge
ip netns exec $NS ip addr add 10.78.0.1/24 dev dhbr0
ip netns exec $NS ip -6 addr add fd78::1/64 dev dhbr0
ip netns exec $NS ip link set dhbr0 up
ip netns exec $NS ip tuntap add dev dhtap0 mode tap
ip netns exec $NS ip link set dhtap0 master dhbr0
ip netns exec $NS ip link set dhtap0 up
cat > "$W/dnsmasq.conf" <<CONF
port=0
interface=dhbr0
bind-interfaces
no-resolv
no-hosts
dhcp-range=10.78.0.100,10.78.0.150,255.255.255.0,1h
enable-ra
dhcp-range=fd78::,ra-only
log-dhcp
log-facility=$W/dnsmasq.log
CONF
ip netns exec $NS tcpdump -i dhbr0 -U -w "$OUT" 'udp port 67 or udp port 68 or udp port 4011' 2>/dev/null &
echo $! > "$W/tcpdump.pid"
ip netns exec $NS dnsmasq --conf-file="$W/dnsmasq.conf" --pid-file="$W/dnsmasq.pid"
if [ $# -gt 0 ]; then ip netns exec $NS "$@" & echo $! > "$W/proxy.pid"; fi
sleep 1
printf '\370\003' > "$W/sercon.bin"
ip netns exec $NS qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none -no-reboot \
  -serial file:"$W/serial.log" -boot n -uuid 3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8 \
  -netdev tap,id=n0,ifname=dhtap0,script=no,downscript=no -device e1000,netdev=n0,mac=52:54:00:78:00:10 \
  -fw_cfg name=etc/sercon-port,file="$W/sercon.bin" -pidfile "$W/qemu.pid" -daemonize
sleep "${CAPTURE_SECONDS:-12}"
cat "$W/serial.log" | tr -d '\r' | tail -20 >&2
