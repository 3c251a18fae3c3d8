"""Volumes and iSCSI exports.

Wiring (the composition root):

    backend = FileBackend(path) | ZfsBackend(pool, kind)               # iscsi.file_backend / zfs_backend
    driver = choose_driver(cfg.iscsi.driver, cfg.iscsi.portals, ...)   # iscsi.exports: ctld | tgt | none
    exports = ExportManager(driver, desired=store_targets)             # coalesces bursts of applies
    await driver.start(); ...; await exports.stop(); await driver.stop()

After changing desired state, `await exports.apply()`. To delete a volume: remove it from the desired
state, `await exports.ensure_unexported(volume)`, then `await backend.destroy(volume,
exported=exports.exported)`. Names: `iscsi.names` (validation and hcc-cello-compatible builders).
"""
