DROP TABLE attendances;
DROP TABLE person_identifiers;
DROP TABLE persons;
