-- One database per keeper: the coordinator's (created by the image) and
-- one per hospital node.
CREATE DATABASE ghx_chonnam OWNER ghx;
CREATE DATABASE ghx_chosun OWNER ghx;
CREATE DATABASE ghx_christian OWNER ghx;
