"""OS template images: where a template comes from (sources), its root file system (rootfs), the Cello
initramfs that logs a node in to its iSCSI root (initramfs), and the build that turns them into a
template volume, its snapshot and the kernel + initrd the nodes boot (build).

Infrastructure like `iscsi`: it runs commands and writes files, and imports `iscsi` and `naming` only.
The domain knows a build as a `TemplateBuilder` callable that the composition root makes from it.
"""
