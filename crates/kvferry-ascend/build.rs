//! Tells kvferry-ascend which ACL functions the CANN headers used to build
//! kvferry-ascend-sys declare (older CANN releases lack some of the subset):
//! `cfg(kvferry_acl_has = "<function>")`, the same cfgs the -sys crate has.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_KVFERRY_ASCEND_ACL_FUNCTIONS");
    println!("cargo:rustc-check-cfg=cfg(kvferry_acl_has, values(any()))");
    let functions = std::env::var("DEP_KVFERRY_ASCEND_ACL_FUNCTIONS").unwrap_or_default();
    for function in functions.split(',').filter(|f| !f.is_empty()) {
        println!("cargo:rustc-cfg=kvferry_acl_has=\"{function}\"");
    }
}
