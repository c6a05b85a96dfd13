#![no_main]
// Logic and invariants: shoal_fs::fuzz::TARGETS; the corpus replays in its tests on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, run) = shoal_fs::fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == "plugin_request")
        .expect("a target of that name");
    run(data);
});
