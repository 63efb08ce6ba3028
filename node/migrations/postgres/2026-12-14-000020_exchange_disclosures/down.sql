DROP TABLE exchange_disclosures;
