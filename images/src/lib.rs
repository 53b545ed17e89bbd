//! The image library (issue 7): the ISO store, virtual appliances stored as
//! content-addressed chunks, and import/export of disk images. Not yet built:
//! this crate only fixes its place in the dependency graph
//! (`images -> blockstore`).
