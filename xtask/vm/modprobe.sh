#!/bin/busybox sh
# /sbin/modprobe of the `cargo xtask vm` initramfs. The kernel's module autoloader
# (/proc/sys/kernel/modprobe, default /sbin/modprobe) resolves that path against the root of
# kthreadd, which stays the initramfs while the command runs chrooted in /newroot. Hand the request
# to the host's real modprobe (kmod) inside the chroot, where /lib/modules/<guest kernel> exists.
exec /bin/busybox chroot /newroot /sbin/modprobe "$@"
