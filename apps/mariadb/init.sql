CREATE DATABASE IF NOT EXISTS sbtest;
CREATE USER IF NOT EXISTS 'sbtest'@'%';
GRANT ALL ON sbtest.* TO 'sbtest'@'%';
