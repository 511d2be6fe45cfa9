//! Alki Fleet control plane library.
