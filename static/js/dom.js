// The page's element lookup, shared by every module.

export const $ = (id) => document.getElementById(id);
