//! Linux netlink Dataplane: netlink inside a pod netns runs on a dedicated thread that has entered it.
