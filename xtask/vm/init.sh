#!/bin/busybox sh
# PID 1 of the `cargo xtask vm` guest. Embedded into the initramfs by xtask/src/vm.rs, which also
# puts /bin/busybox (busybox-static), /modules/*.ko + /modules/order (virtio / 9p / overlay
# modules in dependency order) and the /sbin/modprobe wrapper next to it.
#
# Everything this script prints goes to the kernel console (ttyS0 -> target/vm/runs/*/console.log).
# The command's own output goes to the virtio-serial port named "lbd.out", its exit status to the
# file `status` in the host-shared writable 9p dir "lbdrun".

/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "lbd-vm: $*"; }
die() {
    echo "lbd-vm: FATAL: $*"
    poweroff -f
    sleep 10
    exit 1 # PID 1 exiting panics the kernel, which the host reports
}

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || die "insmod $m"
done

# The 9p transport binds to the virtio-9p PCI devices asynchronously-ish: retry for up to 5 s.
mount9p() { # tag dir opts
    i=0
    until err=$(mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" 2>&1); do
        i=$((i + 1))
        [ "$i" -ge 50 ] && die "cannot mount 9p tag $1 on $2: $err"
        sleep 0.1
    done
}

mount9p hostroot /lower "ro,${LBD_9P_CACHE:-cache=loose}"
mount -t tmpfs -o mode=0755 tmpfs /rw || die "mount tmpfs /rw"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,index=off,metacopy=off,redirect_dir=off \
    overlay /newroot || die "mount overlay"

R=/newroot
mount -t proc proc $R/proc || die "mount $R/proc"
mount -t sysfs sysfs $R/sys || die "mount $R/sys"
mount -t devtmpfs devtmpfs $R/dev || die "mount $R/dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $R/dev/pts || die "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "mount /dev/shm"
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf || die "mount bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null || say "no cgroup2"
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null || say "no debugfs"
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null || true
mkdir -p $R/run/lbd-vm
mount9p lbdrun $R/run/lbd-vm rw

out=
n=0
while [ -z "$out" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = lbd.out ] && [ -c "/dev/${p##*/}" ] && out="/dev/${p##*/}"
    done
    if [ -z "$out" ]; then
        n=$((n + 1))
        [ "$n" -ge 50 ] && die "virtio-serial port lbd.out not found"
        sleep 0.1
    fi
done

hostname lbd-vm
ip link set lo up

say "running command"
cd /
env -i /bin/chroot $R /bin/sh /run/lbd-vm/cmd.sh </dev/null >"$out" 2>&1
rc=$?
echo "$rc" >$R/run/lbd-vm/status.tmp && mv $R/run/lbd-vm/status.tmp $R/run/lbd-vm/status || die "cannot write status"
say "command exited with $rc"
sync
poweroff -f
sleep 10
