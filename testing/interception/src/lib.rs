//! Transparent interception tested for real (`tests/netns.rs`): every pod is a Linux network
//! namespace with exactly the iptables rules the init container (`trellis-init`) installs, its
//! app (`trellis-echo`) and its proxy in transparent mode running as UID 1337; a client in a pod
//! calls a Service's virtual address with no knowledge of any proxy. Needs root (CI runs as
//! root); elsewhere the test prints why it skips. Nothing here is a library: the crate exists for
//! its test.
