#!/usr/bin/env bash
# Installs everything Cello's appliance, demo and tests need on Debian 12 (as root): apt packages, then a
# virtualenv in .venv with the project and its test tools. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-pip make iproute2 kmod cpio e2fsprogs
  qemu-system-x86 ipxe-qemu qemu-block-extra ipxe ovmf
  dnsmasq tftp-hpa tftpd-hpa atftp curl
  tgt libiscsi-bin open-iscsi
  zfs-fuse xfsprogs btrfs-progs
  pxelinux syslinux-common
  linux-image-amd64 busybox-static
  tcpdump shellcheck debootstrap
  # BMC power tests: libvirt runs a qemu domain that sushy-emulator (Redfish) and virtualbmc (IPMI)
  # drive; libvirt-dev, pkg-config and gcc build the libvirt-python wheel they need; openipmi's ipmi_sim
  # is the BMC of a bare qemu process; ipmitool is the client.
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc python3-dev
  openipmi ipmitool openssl
  # bench/boot_storm.py's classic stack serves its iPXE scripts and kernels with nginx; bench/http_bench.py
  # measures Cello's HTTP boot against it with wrk
  nginx-light wrk
  # the dashboard's browser test (tests/browser): headless Chromium and its WebDriver, driven by Selenium
  chromium chromium-driver
  # promtool checks /metrics and the alert rules in contrib/prometheus (tests/integration/test_metrics_promtool.py)
  prometheus
  # the PostgreSQL store backend's tests: tests/pgserver.py runs a throwaway cluster with its initdb/pg_ctl
  postgresql
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts these daemons on install where it can; the tests run their own on their own ports.
for svc in tftpd-hpa dnsmasq tgt prometheus nginx; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then systemctl stop "$svc" || true; fi
done
pkill -x in.tftpd 2>/dev/null || true
# nginx's postinst may start it (no systemd: through its init script); the benchmark runs its own
if [ -x /etc/init.d/nginx ] && pgrep -x nginx >/dev/null 2>&1; then
  /etc/init.d/nginx stop >/dev/null 2>&1 || true
fi
# postgresql's postinst makes a cluster (15/main) and starts it, whatever the init system; the tests start
# their own on a unix socket in a temp folder and must never find this one in their way or rely on it
if command -v pg_lsclusters >/dev/null; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name _port status _rest; do
    case "$status" in online*) pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true ;; esac
  done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cello-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# The native TFTP pump (bootfiles/tftp_native.py, the `tftp.engine` "auto" picks it where built): built
# next to its source whenever that is newer. Linux only (epoll, eventfd); elsewhere Python serves.
pump_src=bootfiles/native/tftp_pump.c
pump_lib=bootfiles/native/libcellotftp.so
if [ "$(uname -s)" = Linux ] && { [ ! -f "$pump_lib" ] || [ "$pump_src" -nt "$pump_lib" ]; }; then
  cc -O2 -g -Wall -Wextra -Werror -std=c11 -shared -fPIC -pthread -o "$pump_lib.tmp" "$pump_src"
  mv "$pump_lib.tmp" "$pump_lib"
fi
