-- Prefect keeps its own state in a separate database on the same server.
CREATE DATABASE prefect OWNER shiftcost;
