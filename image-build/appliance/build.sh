#!/bin/sh
# Build the Cello FreeBSD appliance: on the running FreeBSD system (default), or into a separate root
# (-r DIR, e.g. a base.txz unpacked there) that -i then packs into a bootable GPT disk image.
#
#   sh build.sh [-s CELLO_SOURCE_TREE] [-r ROOT] [-b base.txz] [-i cello-appliance.img] [-S SIZE]
#
# Installs: Python 3.11 and Cello's dependencies from packages, Cello itself (from its source tree),
# syslinux and iPXE loader files for TFTP, the rc.d scripts (cello, cello_firstboot), the default
# config, and enables ctld, zfs and cello in rc.conf. ctld is part of FreeBSD's base system.
# FreeBSD only: it needs pkg(8), sysrc(8), makefs(8) and mkimg(1). It cannot run on Linux.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
source_tree=$(cd "${here}/../.." && pwd)
root=""
base_txz=""
image=""
image_size="4g"
python="python3.11"
py="py311"

usage() {
    echo "usage: $0 [-s CELLO_SOURCE_TREE] [-r ROOT] [-b base.txz] [-i IMAGE] [-S SIZE]" >&2
    exit 2
}

while getopts "s:r:b:i:S:h" opt; do
    case "$opt" in
        s) source_tree=$OPTARG ;;
        r) root=$OPTARG ;;
        b) base_txz=$OPTARG ;;
        i) image=$OPTARG ;;
        S) image_size=$OPTARG ;;
        *) usage ;;
    esac
done

if [ "$(uname -s)" != "FreeBSD" ]; then
    echo "build.sh: this builds the FreeBSD appliance and runs on FreeBSD only (this is $(uname -s))" >&2
    exit 1
fi
if [ -n "$image" ] && [ -z "$root" ]; then
    echo "build.sh: -i needs -r ROOT (the image is packed from that root)" >&2
    exit 2
fi

# Packages: Python + Cello's runtime dependencies (pyproject.toml), and the TFTP loader files.
packages="${py}-pip ${py}-aiohttp ${py}-dnslib ${py}-scapy ${py}-psycopg ${py}-cryptography ${py}-sqlite3
    ${py}-setuptools syslinux ipxe"
pkg_root() {
    if [ -n "$root" ]; then
        pkg --rootdir "$root" "$@"
    else
        pkg "$@"
    fi
}
in_root() {
    if [ -n "$root" ]; then
        chroot "$root" "$@"
    else
        "$@"
    fi
}
conf_file="${root}/etc/rc.conf"

if [ -n "$root" ]; then
    mkdir -p "$root"
    if [ -n "$base_txz" ]; then
        echo "==> unpacking ${base_txz} into ${root}"
        tar -xpf "$base_txz" -C "$root"
    fi
    [ -x "${root}/bin/sh" ] || { echo "build.sh: ${root} holds no FreeBSD base system (give -b base.txz)" >&2; exit 1; }
    cp /etc/resolv.conf "${root}/etc/resolv.conf"
fi

echo "==> packages: ${python} ${packages}"
ASSUME_ALWAYS_YES=yes pkg_root bootstrap -f
# shellcheck disable=SC2086  # a word list of package names
ASSUME_ALWAYS_YES=yes pkg_root install -y python311 ${packages}

echo "==> Cello from ${source_tree}"
stage="${root}/var/tmp/cello-src"
rm -rf "$stage"
mkdir -p "$stage"
(cd "$source_tree" && tar -cf - --exclude .git --exclude .venv --exclude var .) | tar -xf - -C "$stage"
in_root "$python" -m pip install --no-deps --no-build-isolation --prefix /usr/local /var/tmp/cello-src
# Template builds read their init scripts from <prefix>/share/cello/image-build (images/rootfs.py).
mkdir -p "${root}/usr/local/share/cello"
rm -rf "${root}/usr/local/share/cello/image-build"
cp -R "${stage}/image-build" "${root}/usr/local/share/cello/image-build"
rm -rf "$stage"

echo "==> loader files for TFTP"
loaders="${root}/usr/local/share/cello/loaders"
mkdir -p "$loaders"
for f in bios/core/pxelinux.0 bios/com32/elflink/ldlinux/ldlinux.c32 bios/com32/menu/menu.c32 \
         bios/com32/libutil/libutil.c32; do
    src="${root}/usr/local/share/syslinux/${f}"
    [ -f "$src" ] && cp "$src" "$loaders/"
done
for f in undionly.kpxe ipxe.efi snponly.efi; do
    src="${root}/usr/local/share/ipxe/${f}"
    [ -f "$src" ] && cp "$src" "$loaders/"
done
for needed in pxelinux.0 ldlinux.c32 undionly.kpxe ipxe.efi; do
    [ -f "${loaders}/${needed}" ] || echo "build.sh: warning: ${needed} not found in the syslinux/ipxe packages" >&2
done

echo "==> rc.d scripts and the default config"
install -m 0555 "${here}/rc.d/cello" "${root}/usr/local/etc/rc.d/cello"
install -m 0555 "${here}/rc.d/cello_firstboot" "${root}/usr/local/etc/rc.d/cello_firstboot"
install -d -m 0755 "${root}/usr/local/etc/cello"
if [ ! -f "${root}/usr/local/etc/cello/cello.toml" ]; then
    install -m 0640 "${here}/cello.toml" "${root}/usr/local/etc/cello/cello.toml"
fi
install -m 0644 "${here}/cello.toml" "${root}/usr/local/etc/cello/cello.toml.sample"
[ -f "${root}/etc/ctl.conf" ] || install -m 0640 /dev/null "${root}/etc/ctl.conf"

echo "==> rc.conf"
touch "$conf_file"
sysrc -f "$conf_file" zfs_enable="YES" ctld_enable="YES" cello_enable="YES" cello_firstboot_enable="YES" \
    cello_config="/usr/local/etc/cello/cello.toml"
sysrc -f "${root}/boot/loader.conf" zfs_load="YES" ctl_load="YES" 2>/dev/null || true

# CTL's tables are sized once, at boot, from these tunables (powers of two, or CTL falls back to its
# defaults of 1024 LUNs and 256 ports). The appliance's capacity (README.md): 2,000 servers and
# 8,000 LUNs in all; ctld makes one CTL port per server's target, CTL's own ports (tpc, camsim, ioctl,
# HBA ports) take a few more, and LUNs made with `ctladm create` count against the same LUN table.
echo "==> loader.conf: CTL capacity"
loader_conf="${root}/boot/loader.conf"
touch "$loader_conf"
grep -v -e '^kern\.cam\.ctl\.max_luns=' -e '^kern\.cam\.ctl\.max_ports=' "$loader_conf" > "${loader_conf}.new" || true
printf '%s\n' 'kern.cam.ctl.max_luns="8192"' 'kern.cam.ctl.max_ports="2048"' >> "${loader_conf}.new"
mv "${loader_conf}.new" "$loader_conf"

if [ -n "$image" ]; then
    echo "==> disk image ${image} (${image_size})"
    touch "${root}/firstboot"
    printf '/dev/gpt/cello-root\t/\tufs\trw\t1\t1\n' > "${root}/etc/fstab"
    rm -f "${root}/etc/resolv.conf"
    ufs="${image}.ufs"
    makefs -t ffs -B little -s "$image_size" -o label=cello-root -o version=2 "$ufs" "$root"
    mkimg -s gpt -b "${root}/boot/pmbr" \
        -p "freebsd-boot/cello-boot:=${root}/boot/gptboot" \
        -p "efi:=${root}/boot/boot1.efifat" \
        -p "freebsd-ufs/cello-root:=${ufs}" -o "$image" 2>/dev/null ||
    mkimg -s gpt -b "${root}/boot/pmbr" \
        -p "freebsd-boot/cello-boot:=${root}/boot/gptboot" \
        -p "freebsd-ufs/cello-root:=${ufs}" -o "$image"
    rm -f "$ufs"
    echo "==> ${image}: write it to the storage node's boot disk; on first boot cello_firstboot makes the pool"
else
    echo "==> done: 'service cello_firstboot onestart' makes the pool, then 'service cello start'"
fi
